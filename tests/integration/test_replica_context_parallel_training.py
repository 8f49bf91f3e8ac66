"""A custom training loop of a model with a causal local window across
`tf.distribute` replicas that hold segments of one sequence equals one
device (the loop without a window: tests/distribute/
test_replica_context_parallel.py)."""

import pytest

from tests.distribute import replica_cases

pytestmark = pytest.mark.tensorflow_only


def test_custom_training_loop_with_a_window_equals_one_device(rng):
    # A window of 5 keys on segments of 18: the halo is the previous
    # replica's last 5 keys, checked in a traced step.
    replica_cases.assert_training_loop_equals_one_device(rng, window=5)
