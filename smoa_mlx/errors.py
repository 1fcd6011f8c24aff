"""Every named error of the package, under one base class, so callers can catch "anything smoa-mlx refused".

Errors about input (a file, a flag, a model that does not fit) also subclass ``ValueError``, so code that catches
``ValueError`` keeps working; the message names the file, key or flag.
"""

from __future__ import annotations

__all__ = [
    "SMoAError",
    "BaseModelMismatchError",
    "ConversionError",
    "AdapterTypeError",
    "MissingKeysError",
    "ShapeMismatchError",
    "UnsupportedArchitectureError",
]


class SMoAError(Exception):
    """Base class of every error smoa-mlx raises on purpose."""


class BaseModelMismatchError(SMoAError, ValueError):
    """The adapter was trained on other base weights than the model it is being applied to or converted for."""


class ConversionError(SMoAError, ValueError):
    """Base class: the input cannot be converted; nothing was written."""


class AdapterTypeError(ConversionError):
    """The folder holds another kind of adapter (peft_type / fine_tune_type) than the conversion reads."""


class MissingKeysError(ConversionError):
    """Tensors the config promises (or the format needs) are absent from the weights file."""


class ShapeMismatchError(ConversionError):
    """A tensor's shape does not fit the base model's layer (or its partner tensor)."""


class UnsupportedArchitectureError(ConversionError):
    """The model family, or one of its modules, has no known Hugging Face counterpart."""
