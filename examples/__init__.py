"""Runnable examples of keras_favor, run from the repository root as
`python -m examples.NAME` (e.g. `python -m examples.quickstart`)."""
