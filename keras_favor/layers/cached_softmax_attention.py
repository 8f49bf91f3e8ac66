"""The `CachedSoftmaxAttention` layer: exact attention with a decoding
cache."""

import keras
from keras import ops

from keras_favor.layers.attention_cache import check_causal_self_attention
from keras_favor.validation import batch_size as validation_batch_size
from keras_favor.validation import check_cache_shapes
from keras_favor.validation import is_int
from keras_favor.validation import positive_int


@keras.saving.register_keras_serializable(package="keras_favor")
class CachedSoftmaxAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` with `FavorAttention`'s decoding
    cache protocol.

    Exact (quadratic) softmax attention, the baseline beside FAVOR+: the
    same weights, equations and call as `MultiHeadAttention`, plus
    `empty_cache(batch_size, max_length)` and the call arguments `cache=`
    and `cache_update_index=`, as `FavorAttention` takes them. Its cache
    holds the keys and values of every position so far.

    Args:
        **kwargs: `keras.layers.MultiHeadAttention`'s arguments.

    Call arguments:
        query, value, key, query_mask, value_mask, key_mask, attention_mask,
        return_attention_scores, training, use_causal_mask: as in
            `MultiHeadAttention`; `value` defaults to `query`
            (self-attention, the keys then masked by `query_mask`).
        cache: decoding only: the keys, values and key mask of the
            positions so far, from `empty_cache` or a previous cached call.
            Causal self-attention only (`use_causal_mask=True`, `query`
            alone, shape `(B, T, dim)`); keys masked by `query_mask` are no
            keys of any later position (left padding); no dropout.
        cache_update_index: int or scalar tensor, needed with `cache`: the
            position of `query`'s first row, where its keys and values are
            written.

    Returns:
        As `MultiHeadAttention`; with a `cache`, the tuple
        `(outputs, new_cache)`. Run in pieces, each given the cache the
        previous one returned, a sequence gets the outputs of one causal
        call over the whole of it.
    """

    def empty_cache(self, batch_size, max_length=None):
        """The decoding cache before any position.

        Args:
            batch_size: int, number of sequences.
            max_length: int, the most positions the cache will hold.

        Returns:
            A tuple: zero keys `(B, max_length, N, key_dim)`, values
            `(B, max_length, N, value_dim)` and their bool mask
            `(B, max_length)`, all False (no key yet).
        """
        if not self.built:
            raise ValueError(
                "empty_cache() needs a built layer: call it on data (or "
                "build the model) first."
            )
        batch_size = validation_batch_size(batch_size)
        max_length = positive_int(max_length, "max_length")
        heads = (batch_size, max_length, self.num_heads)
        return (
            ops.zeros(heads + (self.key_dim,), self.compute_dtype),
            ops.zeros(heads + (self._value_size(),), self.compute_dtype),
            ops.zeros((batch_size, max_length), "bool"),
        )

    def _value_size(self):
        return self.value_dim or self.key_dim

    def call(
        self,
        query,
        value=None,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
        cache=None,
        cache_update_index=None,
    ):
        if cache is None:
            if value is None:
                value = query
                value_mask = query_mask if value_mask is None else value_mask
            return super().call(
                query,
                value,
                key=key,
                query_mask=query_mask,
                value_mask=value_mask,
                key_mask=key_mask,
                attention_mask=attention_mask,
                return_attention_scores=return_attention_scores,
                training=training,
                use_causal_mask=use_causal_mask,
            )
        self._check_cache_call(
            query, value, key, use_causal_mask, cache, cache_update_index
        )
        return self._call_with_cache(
            query, query_mask, cache, cache_update_index
        )

    def _check_cache_call(
        self, query, value, key, use_causal_mask, cache, index
    ):
        """A `ValueError` naming the argument unless this is a causal
        self-attention call whose `cache` holds `query`'s batch with room
        for it at `index`."""
        check_causal_self_attention(query, value, key, use_causal_mask)
        if index is None:
            raise ValueError(
                "`cache_update_index` is needed with a key/value cache: the "
                "position in the cache where the new keys and values go."
            )
        batch, length = query.shape[:2]
        slots = cache[2].shape[1] if len(cache) == 3 else None
        check_cache_shapes(
            cache,
            [
                (batch, slots, self.num_heads, self.key_dim),
                (batch, slots, self.num_heads, self._value_size()),
                (batch, slots),
            ],
            "query",
            "empty_cache(batch_size, max_length)",
        )
        if (
            is_int(index)
            and None not in (length, slots)
            and (index < 0 or index + length > slots)
        ):
            raise ValueError(
                f"`cache_update_index` ({index}) and the {length} new "
                f"positions do not fit in the key/value cache of {slots} "
                "positions (its `max_length`)."
            )

    def _call_with_cache(self, query, query_mask, cache, index):
        """Causal self-attention for the positions `index, index + 1, ...`:
        the keys and values of `query` are written into the cache at
        `index`, then each query attends to the cached keys at or before
        its own position."""
        keys, values, key_mask = cache
        shape = ops.shape(query)
        new_mask = ops.ones(shape[:2], "bool")
        if query_mask is not None:
            new_mask = ops.cast(query_mask, "bool")
        # The dense sub-layers get no Keras mask (they would warn that they
        # do not support masking): the key mask below does its job.
        query = ops.copy(query)
        start = ops.cast(index, "int32")
        keys = ops.slice_update(
            keys, (0, start, 0, 0), ops.cast(self.key_dense(query), keys.dtype)
        )
        values = ops.slice_update(
            values,
            (0, start, 0, 0),
            ops.cast(self.value_dense(query), values.dtype),
        )
        key_mask = ops.slice_update(key_mask, (0, start), new_mask)
        positions = start + ops.arange(shape[1], dtype="int32")
        causal = (
            ops.arange(ops.shape(keys)[1], dtype="int32")[None, :]
            <= (positions[:, None])
        )
        mask = ops.logical_and(causal[None], key_mask[:, None, :])
        outputs = ops.dot_product_attention(
            self.query_dense(query),
            keys,
            values,
            mask=mask[:, None, :, :],
            scale=1.0 / float(self.key_dim) ** 0.5,
        )
        return self.output_dense(outputs), (keys, values, key_mask)

    def compute_output_spec(
        self,
        query,
        value=None,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
        cache=None,
        cache_update_index=None,
    ):
        outputs = super().compute_output_spec(
            query,
            query if value is None else value,
            key=key,
            return_attention_scores=return_attention_scores and cache is None,
        )
        if cache is None:
            return outputs
        return outputs, tuple(
            keras.KerasTensor(x.shape, dtype=x.dtype) for x in cache
        )
