"""The one error a model file can cause, in a module of its own so that every reader of the file can raise it."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """The model file cannot be used; the message says which file and why."""
