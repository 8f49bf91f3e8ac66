PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# TensorFlow 2.21's oneDNN batch matmul can corrupt the heap on CPU
# (docs/known_issues.md): the demo and the tests use TensorFlow's own kernels.
# `make demo TF_ENABLE_ONEDNN_OPTS=1` runs with oneDNN.
TF_ENABLE_ONEDNN_OPTS ?= 0
export TF_ENABLE_ONEDNN_OPTS

.PHONY: demo test lint docs install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --upgrade pip
	# The data extra: the sequences of the biology examples' smoke tests.
	# The dev extra: ruff and MkDocs for `make lint` and `make docs`.
	# The keras-hub extra: the keras-hub conversion's tests.
	$(BIN)/python -m pip install -e ".[test,data,dev,keras-hub]"
	touch $(STAMP)

install: $(STAMP)

# The edit loop: the unit tests of the core (ops, layers, feature maps,
# projections, models, callbacks, conversion, distribution) on TensorFlow,
# without the integration runs. `make test` runs everything, on both
# backends; `pytest tests/FOLDER` runs one part.
FAST_TESTS := tests/ops tests/layers tests/feature_maps tests/projections \
	tests/models tests/callbacks tests/convert tests/distribute \
	tests/test_backend.py tests/test_package_metadata.py tests/test_random_state.py
.PHONY: test-fast
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not integration" $(FAST_TESTS)

demo: $(STAMP)
	$(BIN)/python -m examples.long_context_lm

# Two workers, idle ones taking tests from busy ones (worksteal), the long
# modules first (tests/conftest.py).
# Then the backend-independent modules again on JAX (tests/conftest.py).
# Each pass ends with its 20 slowest tests.
test: $(STAMP) lint docs
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations=20
	KERAS_BACKEND=jax JAX_PLATFORMS=cpu $(BIN)/python -m pytest -n 2 --dist worksteal -m backend_independent --durations=20

# ruff's settings are in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The documentation site (mkdocs.yml) into site/; a broken link, page or
# docstring fails the build.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build site *.egg-info
