"""The `FeatureMap` base class."""

import keras
from keras import ops

from keras_favor.lookup import Configurable


@keras.saving.register_keras_serializable(package="keras_favor")
class FeatureMap(Configurable):
    """Base class of the kernel feature maps used by `FavorAttention`.

    A feature map turns a head's queries or keys `x` of shape `(..., d)` into
    features `phi(x)` of shape `(..., F)` such that `phi(q) . phi(k)`
    estimates (or defines) the attention kernel `K(q, k)`. Linear attention
    then computes `phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)`.

    Maps built on exponentials would overflow if computed directly, so a map
    returns its features in two parts from `log_scaled`:
    `phi(x) = values * exp(log_scale)`, where `values` is bounded (or `None`,
    meaning ones) and `log_scale` broadcasts against it. `FavorAttention`
    subtracts stabilizing shifts from `log_scale` that cancel exactly in the
    ratio above (docs/numerics.md, sections 1 and 2). A map whose features
    are small already (ReLU, elu + 1) just implements `call` and returns no
    log-scale.

    Subclasses set `requires_projection` (whether the map consumes the random
    projection `W` of shape `(num_features, d)`), override `feature_dim` when
    `F` differs from `num_features`, and implement `call` or `log_scaled`.
    Since a positive factor per query cancels in the ratio, a map may also
    override `query_log_scaled` to skip the parts of a query's features that
    depend on the query alone (the softmax maps skip `exp(-|q|^2 / 2)`).
    Every argument of `__init__` must be returned by `get_config`. Register a
    subclass with `keras.saving.register_keras_serializable` so that models
    using it load without `custom_objects`.

    Example:

    ```python
    @keras.saving.register_keras_serializable(package="my_package")
    class SquaredReluFeatures(keras_favor.feature_maps.FeatureMap):
        def call(self, x, projection):
            projected = keras.ops.einsum("...d,md->...m", x, projection)
            return keras.ops.square(keras.ops.relu(projected)) + 1e-3


    layer = keras_favor.FavorAttention(
        num_heads=4, key_dim=32, feature_map=SquaredReluFeatures()
    )
    ```
    """

    requires_projection = True
    # Whether `phi(q) . phi(k)` estimates the softmax kernel
    # `exp(q . k / sqrt(d))` itself (so it can share a normalizer with it).
    estimates_softmax = False
    # Whether the features take a coefficient `a` from the inputs'
    # statistics (`log_scaled(x, projection, a=...)`), which the layer
    # computes and shares between queries and keys (FAVOR++).
    uses_statistics = False

    def feature_dim(self, num_features, input_dim):
        """Number of features `F` produced for `num_features` projections."""
        return num_features

    def call(self, x, projection):
        """Returns the features `phi(x)` directly, shape `(..., F)`."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement `call(x, projection)` or "
            "`log_scaled(x, projection)`."
        )

    def log_scaled(self, x, projection):
        """Returns `(values, log_scale)` with `phi(x) = values * exp(log_scale)`.

        `values` may be `None` (all ones) and `log_scale` may be `None` (no
        exponential factor). The default returns `(self.call(...), None)`.
        """
        return self.call(x, projection), None

    def query_log_scaled(self, x, projection):
        """Like `log_scaled`, for queries, up to a positive factor per query.

        Such a factor cancels in the ratio `phi(q) S / phi(q) z` of linear
        attention, so a map may leave out the parts of its features that
        depend on the query alone. The default returns `log_scaled`.
        """
        return self.log_scaled(x, projection)

    def __call__(self, x, projection=None):
        """Unstabilized features `phi(x)`, for inspection and tests."""
        values, log_scale = self.log_scaled(x, projection)
        if log_scale is None:
            return values
        scale = ops.exp(log_scale)
        return scale if values is None else values * scale
