"""The version of keras_favor: its one home (setup.cfg reads it)."""

__version__ = "0.1.0"
