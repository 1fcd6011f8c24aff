"""Named errors of the converters, so callers (and tests) can tell a wrong file from a wrong model."""

from __future__ import annotations

from ..fingerprint import BaseModelMismatchError

__all__ = [
    "ConversionError",
    "AdapterTypeError",
    "MissingKeysError",
    "ShapeMismatchError",
    "UnsupportedArchitectureError",
    "BaseModelMismatchError",
]


class ConversionError(ValueError):
    """Base class: the input cannot be converted; nothing was written."""


class AdapterTypeError(ConversionError):
    """The folder holds another kind of adapter (peft_type / fine_tune_type) than the conversion reads."""


class MissingKeysError(ConversionError):
    """Tensors the config promises (or the format needs) are absent from the weights file."""


class ShapeMismatchError(ConversionError):
    """A tensor's shape does not fit the base model's layer (or its partner tensor)."""


class UnsupportedArchitectureError(ConversionError):
    """The model family, or one of its modules, has no known Hugging Face counterpart."""
