"""Shared fixtures: deterministic, small inputs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow 2.21's oneDNN batch matmul corrupts the heap on some broadcast
# shapes (tensorflow/tensorflow#117700, #123109; uxlfoundation/oneDNN#4396):
# 4 of 16 full runs here aborted or segfaulted inside oneDNN's brgemm matmul.
# The tests check keras_favor's numbers, so they run TensorFlow's own kernels;
# set TF_ENABLE_ONEDNN_OPTS=1 to run them with oneDNN.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fixed_random_state():
    """Every test starts from the same global seeds and float32 policy."""
    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
