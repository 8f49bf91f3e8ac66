"""`fit` that builds the optimizer before Keras traces the first step.

On TensorFlow, without a distribution strategy, Keras builds the optimizer
inside the first traced training step, and TensorFlow then traces that step
a second time (a function that created variables is traced again without
them). The tests' `fit` builds it first, under the model's strategy, with
the public `optimizer.build`, as a user may: each step is traced once, with
the same numbers, and a model's first `fit` costs about 40 % less CPU. A
model that is not built yet is left to Keras.
"""

import keras


def fit_with_a_built_optimizer(fit):
    """`fit` (`keras.Model.fit`) that first builds a compiled, built
    model's optimizer."""

    def fit_after_building_the_optimizer(self, *args, **kwargs):
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and self.built and not optimizer.built:
            with self.distribute_strategy.scope():
                optimizer.build(self.trainable_variables)
        return fit(self, *args, **kwargs)

    return fit_after_building_the_optimizer


def install():
    """Replaces `keras.Model.fit` for the rest of this process, on
    TensorFlow (JAX's `fit` builds it before tracing)."""
    if keras.backend.backend() == "tensorflow":
        keras.Model.fit = fit_with_a_built_optimizer(keras.Model.fit)
