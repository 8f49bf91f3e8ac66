"""The `TokenAndPositionEmbedding` layer."""

import keras
from keras import ops

from keras_favor import backend
from keras_favor.initializers import clone_initializer
from keras_favor.validation import is_int
from keras_favor.validation import positive_int


@keras.saving.register_keras_serializable(package="keras_favor")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Sum of a token embedding and a learned position embedding.

    Position `t` of a sequence gets the `t`-th row of a trainable
    `(sequence_length, embedding_dim)` table, so the layer takes sequences of
    any length up to `sequence_length`: the table is sliced to the actual
    length, which may be unknown until the layer is called (as in a
    SavedModel serving signature with shape `(None, None)`).

    Longer sequences raise an error that names `sequence_length` (and
    `max_length`, its name in `build_performer`): a `ValueError` when the
    length is known as the model is traced (eager calls, `fit`, `predict`),
    and otherwise, as in a served SavedModel, a
    `tf.errors.InvalidArgumentError` when the call runs. Token ids outside
    `[0, vocabulary_size)` raise a `ValueError` in an eager call; a traced
    call (`fit`, `predict`, a compiled step) leaves them unchecked, as a
    check there would cost every step.

    Masking: with `mask_zero=True`, token id 0 is padding and the layer
    returns the Keras mask `tokens != 0`, which downstream layers such as
    `PerformerBlock` and `GlobalAveragePooling1D` respect.

    Args:
        vocabulary_size: int, number of token ids.
        sequence_length: int, the longest sequence the layer accepts.
        embedding_dim: int, size of the output vectors.
        embeddings_initializer: initializer of both tables.
        mask_zero: bool, whether id 0 is padding and produces a mask.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: `(batch, length)` integer token ids, `length <=
            sequence_length`.
        start_index: None (positions `0 .. length - 1`), or an int or
            scalar tensor `t`: the inputs are positions `t .. t + length -
            1`, as when decoding after a cache of `t` positions.
            `t + length <= sequence_length` (checked when `t` is an int).

    Returns:
        A `(batch, length, embedding_dim)` tensor.

    Example:

    ```python
    embedding = keras_favor.models.TokenAndPositionEmbedding(
        vocabulary_size=257, sequence_length=128, embedding_dim=64
    )
    vectors = embedding(np.array([[5, 6, 7]]))  # (1, 3, 64)
    ```
    """

    def __init__(
        self,
        vocabulary_size,
        sequence_length,
        embedding_dim,
        embeddings_initializer="uniform",
        mask_zero=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = positive_int(vocabulary_size, "vocabulary_size")
        self.sequence_length = positive_int(sequence_length, "sequence_length")
        self.embedding_dim = positive_int(embedding_dim, "embedding_dim")
        self.embeddings_initializer = keras.initializers.get(
            embeddings_initializer
        )
        self.mask_zero = bool(mask_zero)
        self.supports_masking = self.mask_zero

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                "TokenAndPositionEmbedding expects token ids of shape "
                f"(batch, length). Received: inputs.shape={input_shape}"
            )
        check_length(input_shape[1], self.sequence_length)
        self.token_embedding = keras.layers.Embedding(
            self.vocabulary_size,
            self.embedding_dim,
            embeddings_initializer=clone_initializer(
                self.embeddings_initializer
            ),
            dtype=self.dtype_policy,
            name="token_embedding",
        )
        self.token_embedding.build(input_shape)
        self.position_embeddings = self.add_weight(
            name="position_embeddings",
            shape=(self.sequence_length, self.embedding_dim),
            initializer=clone_initializer(self.embeddings_initializer),
        )
        self.built = True

    def call(self, inputs, start_index=None):
        # A symbolic length, as `model.export` traces the `(None, None)`
        # signature on JAX: no run-time length check there.
        backend.require_static_lengths(
            inputs,
            "TokenAndPositionEmbedding with a length unknown until run "
            "time (a SavedModel export of a `(batch, None)` input)",
        )
        check_length(inputs.shape[1], self.sequence_length)
        check_token_ids(inputs, self.vocabulary_size)
        length = ops.shape(inputs)[1]
        if inputs.shape[1] is None:
            # Unknown until run time (a SavedModel's `(None, None)`
            # signature on TensorFlow): a runtime check, which exported
            # graphs keep. Other backends trace with static shapes,
            # checked above.
            length = backend.checked_less_equal(
                length,
                length,
                self.sequence_length,
                length_error(None, self.sequence_length),
            )
        table = ops.convert_to_tensor(self.position_embeddings)
        if start_index is None:
            positions = table[:length]
        else:
            positions = self._positions_from(table, start_index, inputs)
        return self.token_embedding(inputs) + ops.cast(
            positions, self.compute_dtype
        )

    def _positions_from(self, table, start_index, inputs):
        """The position embeddings of `start_index, start_index + 1, ...`,
        one per position of `inputs` (decoding: the positions after a
        cache)."""
        length = inputs.shape[1]
        if is_int(start_index):
            if start_index < 0:
                raise ValueError(
                    "`start_index` (`cache_update_index`) must be >= 0. "
                    f"Received: {start_index}"
                )
            if length is not None:
                check_length(start_index + length, self.sequence_length)
        if length is None:
            length = ops.shape(inputs)[1]
        start = ops.cast(start_index, "int32")
        return ops.slice(table, (start, 0), (length, self.embedding_dim))

    def compute_mask(self, inputs, mask=None, start_index=None):
        if not self.mask_zero:
            return None
        return ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.embedding_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "sequence_length": self.sequence_length,
                "embedding_dim": self.embedding_dim,
                "embeddings_initializer": keras.initializers.serialize(
                    self.embeddings_initializer
                ),
                "mask_zero": self.mask_zero,
            }
        )
        return config


def length_error(length, sequence_length):
    """The message for token sequences longer than `sequence_length`."""
    received = "" if length is None else f" of length {length}"
    return (
        f"Token sequences{received} are longer than the model accepts: at "
        f"most {sequence_length} tokens, the `max_length` of "
        "`build_performer` (the `sequence_length` of "
        "`TokenAndPositionEmbedding`). Truncate them, or build the model "
        "with a larger `max_length`."
    )


def check_token_ids(token_ids, vocabulary_size):
    """A `ValueError` if eager `token_ids` fall outside `[0,
    vocabulary_size)`. Traced ids are not checked (the check would cost
    every compiled step); `keras_favor.generate` checks its prompts."""
    if not backend.is_concrete(token_ids):
        return
    ids = ops.convert_to_numpy(token_ids)
    if ids.size == 0:
        return
    low, high = ids.min(), ids.max()
    if low < 0 or high >= vocabulary_size:
        raise ValueError(
            f"`inputs` must be token ids in [0, {vocabulary_size}), the "
            f"`vocabulary_size` of the embedding. Received: ids from {low} "
            f"to {high}"
        )


def check_length(length, sequence_length):
    """A `ValueError` if the static `length` exceeds `sequence_length`."""
    if length is not None and length > sequence_length:
        raise ValueError(length_error(length, sequence_length))
