"""Errors of the model layer; each names the file (or model) and the problem."""

from __future__ import annotations


class ModelLoadError(Exception):
    """A model could not be loaded: corrupt file, unsupported type or architecture."""


class UnknownModelError(ModelLoadError):
    """A model name is neither in the catalog nor a path."""
