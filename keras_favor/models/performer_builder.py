"""`build_performer`: Performer models in one call."""

import keras

from keras_favor.layers.performer_block import PerformerBlock
from keras_favor.models.token_and_position_embedding import (
    TokenAndPositionEmbedding,
)
from keras_favor.validation import boolean
from keras_favor.validation import dropout_rate
from keras_favor.validation import optional_seed
from keras_favor.validation import positive_int

TASKS = ("classification", "language_model", "encoder")
APIS = ("functional", "sequential")


def build_performer(
    vocabulary_size,
    max_length,
    num_layers=2,
    num_heads=4,
    hidden_dim=128,
    intermediate_dim=None,
    task="classification",
    num_classes=2,
    dropout=0.0,
    seed=None,
    api="functional",
    attention="favor",
    normalize_first=True,
    mask_zero=True,
    name=None,
    **attention_options,
):
    """Builds a Performer: embeddings, `PerformerBlock`s and a task head.

    The model maps `(batch, length)` integer token ids, for any `length` up
    to `max_length`, to:

    - `task="classification"`: `(batch, num_classes)` logits, from the mean
      of the last block's outputs over the non-padding positions.
      Bidirectional attention.
    - `task="language_model"`: `(batch, length, vocabulary_size)` logits,
      where position `t` predicts token `t + 1`. Causal attention: the
      prediction at `t` depends on tokens `<= t` only. Train it on
      `(tokens[:, :-1], tokens[:, 1:])` with the loss
      `keras_favor.models.language_model_loss()` (see Masking).
    - `task="encoder"`: `(batch, length, hidden_dim)` contextual vectors.
      Bidirectional attention.

    Tokens are embedded by a token embedding plus a learned position
    embedding (`keras_favor.models.TokenAndPositionEmbedding`), then pass
    through `num_layers` `PerformerBlock`s. With pre-norm blocks a final
    `LayerNormalization` follows. The model is not compiled; outputs are
    logits (use `from_logits=True` losses).

    `api="functional"` returns a functional `keras.Model`, `api="sequential"`
    a `keras.Sequential` with the same layers, the same layer names and the
    same weights layout: `set_weights` copies weights between the two.

    Masking: with `mask_zero=True` (the default), token id 0 is padding: it
    is masked out of attention and out of the classifier's mean. The
    language model's loss must skip the positions whose *target* is
    padding, which the inputs cannot tell (with `(tokens[:, :-1],
    tokens[:, 1:])`, the last real input token of a padded sequence has the
    target 0). So the language model's logits carry no Keras mask, and the
    loss ignores target 0 itself: compile with
    `keras_favor.models.language_model_loss()`, which is
    `keras.losses.SparseCategoricalCrossentropy(from_logits=True,
    ignore_class=0)`; `fit` and `evaluate` then average over the non-padding
    targets. (A plain `SparseCategoricalCrossentropy` would also train on
    the padding targets. Metrics see every position: give them
    `sample_weight=targets != 0` through `weighted_metrics`.)

    Args:
        vocabulary_size: int, number of token ids (including the padding
            id 0 when `mask_zero=True`).
        max_length: int, the longest input sequence.
        num_layers: int, number of `PerformerBlock`s.
        num_heads: int, attention heads per block.
        hidden_dim: int, width of the embeddings and of every block; must be
            divisible by `num_heads`.
        intermediate_dim: int, width of the feed-forward hidden layer.
            Defaults to `4 * hidden_dim`.
        task: `"classification"` (default), `"language_model"` or
            `"encoder"`.
        num_classes: int, number of classes for classification (ignored by
            the other tasks).
        dropout: float in `[0, 1)`, dropout after the embeddings and in
            every block.
        seed: int or None. Block `i` gets seed `seed + i`, so that layers
            draw different but reproducible projections.
        api: `"functional"` (default) or `"sequential"`.
        attention: `"favor"` (default) or `"exact"` (softmax attention, a
            baseline with the same architecture), see `PerformerBlock`.
        normalize_first: bool, pre-norm (True, default) or post-norm blocks.
        mask_zero: bool, whether token id 0 is padding.
        name: optional model name.
        **attention_options: `FavorAttention`'s FAVOR options for every
            block (such as `feature_map`, `num_features` or
            `local_window`; see `FavorAttention` for all of them).

    Returns:
        An uncompiled `keras.Model` (or `keras.Sequential`).

    Raises:
        ValueError: for an argument outside what is allowed above; the
            message names the argument. At call time, token sequences
            longer than `max_length` raise an error that names
            `max_length`, also from an exported SavedModel.

    Example:

    ```python
    model = keras_favor.build_performer(
        vocabulary_size=20000,
        max_length=512,
        num_layers=2,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=256,
        task="classification",
        num_classes=2,
        num_features=64,
        seed=0,
    )
    model.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

    lm = keras_favor.build_performer(
        vocabulary_size=257, max_length=512, task="language_model", seed=0
    )
    lm.compile("adam", keras_favor.models.language_model_loss())
    lm.fit(tokens[:, :-1], tokens[:, 1:])  # token id 0 is padding
    ```
    """
    if task not in TASKS:
        raise ValueError(
            f"`task` must be one of {list(TASKS)}. Received: task={task!r}"
        )
    if api not in APIS:
        raise ValueError(
            f"`api` must be one of {list(APIS)}. Received: api={api!r}"
        )
    vocabulary_size = positive_int(vocabulary_size, "vocabulary_size")
    max_length = positive_int(max_length, "max_length")
    num_layers = positive_int(num_layers, "num_layers")
    num_heads = positive_int(num_heads, "num_heads")
    hidden_dim = positive_int(hidden_dim, "hidden_dim")
    if hidden_dim % num_heads:
        raise ValueError(
            f"`hidden_dim` ({hidden_dim}) must be divisible by `num_heads` "
            f"({num_heads})."
        )
    intermediate_dim = positive_int(
        intermediate_dim, "intermediate_dim", allow_none=True
    )
    if intermediate_dim is None:
        intermediate_dim = 4 * hidden_dim
    if task == "classification":
        num_classes = positive_int(num_classes, "num_classes")
    dropout = dropout_rate(dropout, "dropout")
    seed = optional_seed(seed, "seed")
    normalize_first = boolean(normalize_first, "normalize_first")
    mask_zero = boolean(mask_zero, "mask_zero")
    if name is not None and not isinstance(name, str):
        raise ValueError(
            f"`name` must be a string or None. Received: name={name!r}"
        )
    layers = [
        TokenAndPositionEmbedding(
            vocabulary_size,
            max_length,
            hidden_dim,
            mask_zero=mask_zero,
            name="embedding",
        ),
        keras.layers.Dropout(dropout, name="embedding_dropout"),
    ]
    for index in range(num_layers):
        layers.append(
            PerformerBlock(
                num_heads=num_heads,
                intermediate_dim=intermediate_dim,
                dropout=dropout,
                normalize_first=normalize_first,
                causal=task == "language_model",
                attention=attention,
                attention_options=dict(
                    attention_options,
                    seed=None if seed is None else seed + index,
                ),
                name=f"performer_block_{index}",
            )
        )
    if normalize_first:
        layers.append(keras.layers.LayerNormalization(name="final_norm"))
    layers.extend(task_head(task, vocabulary_size, num_classes))
    inputs = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    if api == "sequential":
        return keras.Sequential([inputs] + layers, name=name)
    outputs = inputs
    for layer in layers:
        outputs = layer(outputs)
    return keras.Model(inputs, outputs, name=name)


def task_head(task, vocabulary_size, num_classes):
    """The layers after the last block, for `task`."""
    if task == "classification":
        return [
            keras.layers.GlobalAveragePooling1D(name="pooling"),
            keras.layers.Dense(num_classes, name="logits"),
        ]
    if task == "language_model":
        return [LanguageModelLogits(vocabulary_size, name="logits")]
    return []


def language_model_loss():
    """The loss of a `build_performer(task="language_model")` model.

    `keras.losses.SparseCategoricalCrossentropy(from_logits=True,
    ignore_class=0)`: the cross-entropy of the next-token logits, averaged
    over the positions whose target is not the padding id 0. With the
    recipe `(tokens[:, :-1], tokens[:, 1:])` these are exactly the
    predictions of real tokens (the prediction after a sequence's last
    token, whose target is padding, is left out). For a model built with
    `mask_zero=False`, where 0 is an ordinary token, use
    `SparseCategoricalCrossentropy(from_logits=True)` instead.

    Returns:
        A `keras.losses.Loss`.

    Example:

    ```python
    lm = keras_favor.build_performer(
        vocabulary_size=257, max_length=128, task="language_model"
    )
    lm.compile("adam", keras_favor.models.language_model_loss())
    lm.fit(tokens[:, :-1], tokens[:, 1:])
    ```
    """
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=0, name="language_model_loss"
    )


@keras.saving.register_keras_serializable(package="keras_favor")
class LanguageModelLogits(keras.layers.Dense):
    """The language model's head: a `Dense` whose output has no Keras mask.

    The padding mask of the inputs is the wrong mask for the next-token
    loss (see `build_performer`), so the head drops it: Keras then applies
    no input mask to the loss or the metrics, and
    `language_model_loss()` ignores the padding targets instead.
    """

    def compute_mask(self, inputs, mask=None):
        return None
