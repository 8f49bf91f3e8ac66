"""The `FeatureRedraw` callback."""

import warnings
import zlib

import keras
import numpy as np

from keras_favor import backend
from keras_favor import layer_tree
from keras_favor.layers.favor_attention import FavorAttention
from keras_favor.validation import non_negative_int
from keras_favor.validation import optional_seed
from keras_favor.validation import positive_int


def favor_attention_layers(model):
    """Every `FavorAttention` inside `model`, found recursively.

    Each layer is reached through its index path: the position of each
    sub-layer among its parent's sub-layers (see `layer_tree.sublayers`),
    from `model` down, joined by "/" (`"2/0/1"`). Index paths do not depend
    on layer names, which Keras numbers differently every time a model is
    rebuilt in the same process, and they are the same for a model and the
    model loaded from its `.keras` file.

    Args:
        model: a `keras.layers.Layer`, usually a `keras.Model`.

    Returns:
        A dict from index path to layer, in depth-first order. A layer
        shared by several parents appears once, at its first path.
    """
    return {
        "/".join(path): layer
        for path, layer in layer_tree.depth_first(model, _indexed_sublayers)
        if isinstance(layer, FavorAttention)
    }


def _indexed_sublayers(layer):
    return [
        (str(index), child)
        for index, child in enumerate(layer_tree.sublayers(layer))
    ]


def path_hash(path):
    """A stable 32-bit hash of a layer path (Python's `hash` of a string
    changes from one process to the next)."""
    return zlib.crc32(path.encode("utf-8"))


def projection_fingerprint(layer):
    """A 32-bit hash of the layer's current projection, bit for bit."""
    projection = keras.ops.convert_to_numpy(layer.projection)
    return zlib.crc32(np.ascontiguousarray(projection).tobytes())


@keras.saving.register_keras_serializable(package="keras_favor")
class FeatureRedraw(keras.callbacks.Callback):
    """Redraws the random projection of every `FavorAttention` during `fit`.

    The Performer recipe draws a fresh random projection every few thousand
    training steps, so that no single draw's error is baked into the trained
    weights. Every `interval` optimizer steps this callback calls
    `redraw_features` on every `FavorAttention` in the model, found
    recursively through nested layers and models. It never redraws during
    `evaluate` or `predict` (nor during the validation inside `fit`), and the
    layers themselves never redraw at inference: a trained model always gives
    the same output for the same input.

    Redraws are deterministic and need no communication. The `k`-th redraw of
    a layer (`k = layer.redraw_count + 1`) uses the stateless seed

        fold_in([seed, crc32(path)], k)

    where `path` is the layer's index path in the model (the position of
    each sub-layer in its parent, for example `"3/1"`; `sublayers` defines
    the order). So two runs with the same seeds get the same
    projections, every replica and every worker of a `tf.distribute`
    strategy computes the same values on its own, and different layers get
    different projections.

    Across Keras backends the seeds are the same, but not the projections:
    each backend's stateless generator turns a seed into numbers of its own
    (TensorFlow's `tf.random.stateless_*` ops, JAX's `jax.random` keys), so
    a run on JAX redraws other projections than the same run on TensorFlow,
    from the same distribution. On each backend a seed gives the same
    projection in every run, process and replica. The layers' initial
    projections (their `seed`) differ between backends in the same way;
    copy the weights (`get_weights`, a `.keras` file) to carry a
    projection from one backend to the other.

    When to redraw is decided from `model.optimizer.iterations`, not from a
    counter of its own: a redraw is due at the end of every training batch
    that brings the iteration count to (or, with `steps_per_execution > 1`,
    past) a multiple of `interval`.

    No redraw at the end of a `fit`: a model evaluated right after a redraw
    has had no steps to adapt to its new features, and can be much worse
    than before it. So a due redraw is skipped when `fit` ends within
    `final_window` steps of it (by default `interval` steps): over a `fit`
    whose step count is a multiple of `interval`, the last redraw comes
    `interval` steps before the end, not on the last step. A skipped redraw
    is not made up. The end is planned at the start of the first epoch of
    each `fit` call, from `self.params`: the optimizer step then, plus the
    steps per epoch (`params["steps"]`) times the epochs left (`epochs`
    less the epoch `fit` starts from). When `fit` does not know its steps
    per epoch (a generator, or a dataset of unknown length, without
    `steps_per_epoch`), the end is unknown and the rule cannot apply: the
    callback warns at the start of that `fit` (unless `final_window=0`)
    and redraws every `interval` steps up to the end. Pass `steps_per_epoch`
    to keep the rule.

    Whether redraws help: on the quickstart's byte-level language model (2
    blocks, hidden 128, 64 features, context 128, 1,200 steps; see
    `benchmarks/quality.py` and BENCHMARKS.md, "Feature redraws and
    quality"), redrawing every 300 steps under this rule ended 0.8 % worse
    than keeping the initial projection (2.960 against 2.935 validation bits
    per byte, the mean of 2 seeds, each seed worse): redraws did not help
    there. Redrawing up to the last step (`final_window=0`) ended 20 % worse
    (3.52). Training much longer than the interval, the setting of the
    Performer recipe, was not measured.

    The iteration count and each layer's `redraw_count` are model weights,
    saved by `model.save` (`.keras`), `model.save_weights`,
    `tf.train.Checkpoint` and `keras.callbacks.BackupAndRestore`. A run that
    is interrupted and resumed from any of them, with the `epochs` of the
    whole training (and, from a file or checkpoint, the `initial_epoch` to
    go on from), plans the end of the whole training, so it redraws and
    skips at the same steps, with the same seeds, and ends with exactly the
    projections of an uninterrupted run. With a callback that saves every
    few batches (for example `ModelCheckpoint(save_freq=N)`), list
    `FeatureRedraw` before it so that a save at a redraw step includes the
    redraw.

    Under `tf.distribute`, Keras runs callbacks in cross-replica context, so
    each redraw assigns the same projection to every replica's copy.

    Keeping a layer's projection fixed: the callback skips every
    `FavorAttention` whose `trainable` is False (as a frozen
    `BatchNormalization` stops updating its statistics), so
    `layer.trainable = False` freezes its projection with its weights. To
    keep the projection fixed while the layer's weights train, subclass the
    callback and filter `layers_to_redraw()`, for example
    `return {p: l for p, l in super().layers_to_redraw().items()
    if l.name != "cross_attention"}`. A layer with `feature_map="elu"` has
    no projection and is left alone.

    A callback with nothing to redraw (no `FavorAttention` in the model, or
    none that is trainable and has a projection) warns once at the start of
    every `fit`, saying why, and then does nothing.

    Args:
        interval: int, the number of training steps between redraws.
            Defaults to 1000.
        seed: int or None. With an int, the sequence of projections is
            reproducible across runs and machines. With None (the default),
            each redraw is seeded from a hash of the layer's current
            projection instead of `seed`: runs whose initial projections
            differ get different sequences, yet every replica and worker
            (which share the initial projection) and every resumed run
            (which restores it) still agree. Give an int when runs must
            match each other exactly.
        verbose: 0 (silent, default) or 1 (print a line at each redraw,
            and at each one skipped in the final window).
        final_window: int >= 0 or None, the number of final steps of a
            `fit` call in which no redraw is made. None (the default) means
            `interval`; 0 redraws up to the last step.

    Example:

    ```python
    model.fit(
        dataset,
        epochs=10,
        callbacks=[
            keras_favor.FeatureRedraw(interval=1000, seed=1),
            keras.callbacks.BackupAndRestore("/tmp/backup"),
        ],
    )
    ```

    References:
        - [Choromanski et al., 2021](https://arxiv.org/abs/2009.14794),
          section 4 (feature redrawing).
    """

    def __init__(self, interval=1000, seed=None, verbose=0, final_window=None):
        super().__init__()
        self.interval = positive_int(interval, "interval")
        self.seed = optional_seed(seed)
        if verbose not in (0, 1):
            raise ValueError(
                f"`verbose` must be 0 or 1. Received: verbose={verbose!r}"
            )
        self.verbose = verbose
        self.final_window = non_negative_int(
            final_window, "final_window", allow_none=True
        )
        self._batch_start_step = None
        self._planned_end = None
        self._plan_pending = False

    @property
    def window(self):
        """The number of final steps of a `fit` call without redraws:
        `final_window`, or `interval` when that is None."""
        if self.final_window is None:
            return self.interval
        return self.final_window

    def layers_to_redraw(self):
        """The layers this callback redraws, as a dict from index path to
        layer: every trainable `FavorAttention` with a projection."""
        return {
            path: layer
            for path, layer in favor_attention_layers(self.model).items()
            if layer.trainable and layer.projection is not None
        }

    def redraw_seed(self, path, layer):
        """The stateless seed of the layer's next redraw."""
        count = int(keras.ops.convert_to_numpy(layer.redraw_count))
        base = self.seed
        if base is None:
            base = projection_fingerprint(layer)
        return backend.fold_in(
            backend.int_pair_seed(base, path_hash(path)), count + 1
        )

    def redraw(self):
        """Redraws every layer of `layers_to_redraw()` now; returns them."""
        layers = self.layers_to_redraw()
        for path, layer in layers.items():
            layer.redraw_features(self.redraw_seed(path, layer))
        return layers

    def on_train_begin(self, logs=None):
        self._planned_end = None
        self._plan_pending = True
        if not self.layers_to_redraw():
            warnings.warn(self._nothing_to_redraw_message(), stacklevel=2)
        elif self.window and self._steps_per_epoch() is None:
            warnings.warn(
                "FeatureRedraw cannot keep the last "
                f"final_window={self.window} steps of this `fit` free of "
                "redraws: the number of steps per epoch is unknown. It "
                f"redraws every {self.interval} steps up to the end, so the "
                "model may end on features it has not trained with. Pass "
                "`steps_per_epoch` to `fit` (or data of known length), or "
                "`final_window=0` to silence this warning.",
                stacklevel=2,
            )

    def on_epoch_begin(self, epoch, logs=None):
        # The first epoch of a `fit` call comes after BackupAndRestore has
        # restored the step count and chosen the epoch to resume from.
        if not self._plan_pending:
            return
        self._plan_pending = False
        self._planned_end = self.planned_end(epoch)

    def planned_end(self, epoch):
        """The optimizer step at which the `fit` call now starting `epoch`
        will end, or None when `fit` does not know its steps per epoch."""
        steps = self._steps_per_epoch()
        if steps is None:
            return None
        epochs = (self.params or {}).get("epochs", 1)
        return self.training_step() + max(0, epochs - epoch) * steps

    def _steps_per_epoch(self):
        steps = (self.params or {}).get("steps")
        return int(steps) if steps else None

    def in_final_window(self, step):
        """Whether a redraw at `step` falls within the last `window` steps
        of the current `fit` call (never when its end is unknown)."""
        if not self.window or self._planned_end is None:
            return False
        return self._planned_end - step < self.window

    def _nothing_to_redraw_message(self):
        layers = favor_attention_layers(self.model)
        if not layers:
            reason = "holds no FavorAttention layer"
        else:
            with_projection = [
                layer
                for layer in layers.values()
                if layer.projection is not None
            ]
            if not with_projection:
                reason = (
                    f"holds {len(layers)} FavorAttention layer(s), none with "
                    "a random projection (their feature maps, such as "
                    "'elu' or 'relu', use none)"
                )
            elif not any(layer.trainable for layer in with_projection):
                reason = (
                    f"holds {len(with_projection)} FavorAttention layer(s) "
                    "with a projection, all with `trainable=False` (the "
                    "callback leaves frozen layers alone)"
                )
            else:
                reason = (
                    "has FavorAttention layers to redraw, but "
                    "`layers_to_redraw()` returned none"
                )
        return (
            f"FeatureRedraw will redraw nothing: the model "
            f"{self.model.name!r} {reason}. Remove the callback, or give it "
            "a model with a trainable FavorAttention whose feature map uses "
            "a projection (such as the default 'softmax')."
        )

    def training_step(self):
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_start_step = self.training_step()

    def on_train_batch_end(self, batch, logs=None):
        step = self.training_step()
        start = self._batch_start_step
        if start is None:
            start = step - 1
        self._batch_start_step = None
        if step // self.interval <= start // self.interval:
            return
        if self.in_final_window(step):
            if self.verbose:
                print(
                    f"\nFeatureRedraw: step {step}, no redraw: training ends "
                    f"at step {self._planned_end}, within final_window="
                    f"{self.window} steps.",
                    flush=True,
                )
            return
        layers = self.redraw()
        if self.verbose:
            print(
                f"\nFeatureRedraw: step {step}, redrew the projection "
                f"of {len(layers)} FavorAttention layer(s).",
                flush=True,
            )

    def get_config(self):
        return {
            "interval": self.interval,
            "seed": self.seed,
            "verbose": self.verbose,
            "final_window": self.final_window,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
