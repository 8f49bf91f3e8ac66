"""Benchmarks of keras_favor: speed, memory, quality and approximation.

Each module runs from the repository root as `python -m benchmarks.NAME`;
`python -m benchmarks.run` runs the named configurations of
`benchmarks.registry` and compares two commits side by side.
"""
