"""FAVOR++: optimal positive random features for the softmax kernel."""

import math

import keras
from keras import ops

from keras_favor.feature_maps.feature_map import FeatureMap
from keras_favor.feature_maps.softmax_features import half_sq_norm
from keras_favor.feature_maps.softmax_features import random_projection
from keras_favor.feature_maps.softmax_features import temperature_scaled


def optimal_coefficient(statistic, dim):
    """The variance-minimising `A <= 0` for inputs whose pairs have mean
    `|x~ + y~|^2 = statistic` (Likhosherstov et al., 2022, Theorem 3.1):
    `1 - 8A = (2p + d + sqrt((2p + d)^2 + 8 d p)) / (2d)`; 0 for `p = 0`."""
    p = ops.maximum(ops.cast(statistic, "float32"), 0.0)
    root = ops.sqrt(ops.square(2 * p + dim) + 8 * dim * p)
    return (1.0 - (2 * p + dim + root) / (2 * dim)) / 8.0


def _moments(x, mask, total):
    """The mean vector `(B, H, d)` and mean squared norm `(B, H)` of
    `(B, H, L, d)` rows, rows where the bool `(B, 1, L)` mask is False left
    out; `total` sums the per-position sums over the segments of a sequence
    split across devices."""
    if mask is None:
        weights = ops.ones_like(x[..., 0])
    else:
        weights = ops.cast(mask, x.dtype) + ops.zeros_like(x[..., 0])
    count, vector_sum, square_sum = total(
        (
            ops.sum(weights, axis=-1),
            ops.sum(x * weights[..., None], axis=2),
            ops.sum(ops.sum(ops.square(x), -1) * weights, -1),
        )
    )
    count = ops.maximum(count, 1.0)
    return vector_sum / count[..., None], square_sum / count


def _unsplit(sums):
    return sums


def pair_statistic(query, key, mask=None, query_mask=None, total=None):
    """The mean of `|q~ + k~|^2` over all query-key pairs, per batch and
    head, without gradient: `mean|q~|^2 + mean|k~|^2 + 2 mean(q~).mean(k~)`
    from `(B, H, T, d)` queries and `(B, H, S, d)` keys; masked keys
    (`mask`, bool `(B, 1, S)`) and queries (`query_mask`, `(B, 1, T)`) are
    left out. `total`: None, or for a sequence split across devices, a
    function that sums a tuple of tensors over the segments. Returns
    `(B, H)`."""
    total = total or _unsplit
    query_mean, query_square = _moments(
        temperature_scaled(query), query_mask, total
    )
    key_mean, key_square = _moments(temperature_scaled(key), mask, total)
    statistic = (
        query_square + key_square + 2 * ops.sum(query_mean * key_mean, -1)
    )
    return ops.stop_gradient(statistic)


@keras.saving.register_keras_serializable(package="keras_favor")
class FavorPlusPlusFeatures(FeatureMap):
    """FAVOR++ optimal positive random features (Likhosherstov et al., 2022).

    `phi(x) = (1 - 4A)^(d/4) / sqrt(m) * exp(A |w|^2 + sqrt(1 - 4A) w . x~
    - |x~|^2 / 2)` for each projection row `w`, with `x~ = x d^(-1/4)`:
    unbiased for the softmax kernel `exp(x . y / sqrt(d))` for every
    `A <= 0`, and of least variance at the `A` that `optimal_coefficient`
    gives from the inputs' statistic `p = mean |x~ + y~|^2`. `A = 0` is
    FAVOR+ (`SoftmaxFeatures`). Queries and keys must share `A`.

    Where `A` comes from (chosen by `FavorAttention`):

    - Bidirectional attention: the statistic of the current queries and
      keys, per batch element and head, under stop-gradient, padded keys
      and queries left out: the queries by their mask, or, in
      self-attention without one, by the keys' (the same positions).
    - Causal attention: a statistic from the current call would let a query
      depend on later keys, and per-position statistics would break the
      linear state (query and key features must share `A`). The layer keeps
      a per-head moving average of the statistic over training batches
      instead (a saved non-trainable weight, the mean over replicas),
      updated after each training call and used as it stood before it, as
      `BatchNormalization` keeps its moving mean; inference and decoding
      use the stored value. It starts at 0 (FAVOR+) and follows the data
      with `momentum`.
    - A sequence split across devices (`keras_favor.distribute`): the
      statistic of the whole sequence, its sums added across the devices.

    Args:
        momentum: float in `[0, 1)`, the moving average's momentum (causal
            attention).

    Example:

    ```python
    layer = keras_favor.FavorAttention(4, 32, feature_map="favor++")
    ```

    References:
        - [Likhosherstov et al., 2022](https://arxiv.org/abs/2205.15317)
        - [Choromanski et al., 2021](https://arxiv.org/abs/2009.14794)
    """

    estimates_softmax = True
    uses_statistics = True

    def __init__(self, momentum=0.99):
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, (int, float))
            or not 0 <= momentum < 1
        ):
            raise ValueError(
                "`momentum` must be a number in [0, 1). Received: "
                f"momentum={momentum!r}"
            )
        self.momentum = float(momentum)

    def statistic(self, query, key, mask=None, query_mask=None, total=None):
        """The inputs' statistic `p` per batch and head (see
        `pair_statistic`)."""
        return pair_statistic(query, key, mask, query_mask, total)

    def coefficient(self, statistic, dim):
        """`A` for a statistic `p` (see `optimal_coefficient`)."""
        return optimal_coefficient(statistic, dim)

    def _exponent(self, x, projection, a):
        """`A |w|^2 + sqrt(1 - 4A) w . x~`, `(..., m)`, for `A` that
        broadcasts against `x[..., :1]`."""
        projected = random_projection(x, projection)
        if a is None:
            return projected
        row_norms = ops.sum(ops.square(projection), axis=-1)
        return a * row_norms + ops.sqrt(1.0 - 4.0 * a) * projected

    def log_scaled(self, x, projection, a=None):
        num_features, dim = projection.shape
        row_term = half_sq_norm(x) + 0.5 * math.log(num_features)
        if a is not None:
            row_term = row_term - 0.25 * dim * ops.log(1.0 - 4.0 * a)
        return None, self._exponent(x, projection, a) - row_term

    def query_log_scaled(self, x, projection, a=None):
        return None, self._exponent(x, projection, a)

    def get_config(self):
        return {"momentum": self.momentum}
