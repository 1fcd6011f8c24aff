"""Every named error of the package, under one base class, so callers can catch "anything smoa-mlx refused".

Errors about input (a file, a flag, a model that does not fit) also subclass ``ValueError``, and those about a
missing file or an existing output ``FileNotFoundError`` / ``FileExistsError``, so code that catches the built-in
kinds keeps working. Every message names the file, key or flag at fault.

    SMoAError
    ├── OptionError                 a flag, option or hyperparameter value (names the flag or key)
    ├── DataError                   training data (names the file and line)
    ├── AdapterError                an adapter folder that cannot be read or does not fit the model
    │   ├── AdapterNotFoundError    the folder or one of its files is missing
    │   ├── AdapterFileError        a file is unreadable: bad JSON, truncated or corrupt safetensors
    │   ├── AdapterTypeError        another kind of adapter than the one asked for
    │   ├── MissingKeysError        tensors the config promises are absent
    │   ├── ShapeMismatchError      a tensor does not fit the base layer (or its partner tensor)
    │   └── BaseModelMismatchError  the adapter was trained on other base weights
    ├── ConversionError             no faithful conversion exists (architecture, grouping, folder clash)
    │   ├── UnsupportedArchitectureError
    │   └── GroupingMismatchError
    ├── SavePathExistsError         an output folder exists and --force was not given
    ├── HubUnreachableError         a Hugging Face id was given, and neither the hub nor the local cache has it
    ├── NoChatTemplateError         the tokenizer cannot render a conversation
    ├── DiskFullError               a write ran out of space; the previous file or folder is intact
    └── TrainingDiverged            the loss or the weights became NaN/inf; the last good checkpoint is kept
"""

from __future__ import annotations

__all__ = [
    "SMoAError",
    "OptionError",
    "DataError",
    "AdapterError",
    "AdapterNotFoundError",
    "AdapterFileError",
    "AdapterTypeError",
    "MissingKeysError",
    "ShapeMismatchError",
    "BaseModelMismatchError",
    "ConversionError",
    "UnsupportedArchitectureError",
    "GroupingMismatchError",
    "SavePathExistsError",
    "HubUnreachableError",
    "NoChatTemplateError",
    "DiskFullError",
    "TrainingDiverged",
    "FolderInUseError",
    "CheckpointError",
    "ResumeMismatchError",
]


class SMoAError(Exception):
    """Base class of every error smoa-mlx raises on purpose."""


class OptionError(SMoAError, ValueError):
    """A flag, option or hyperparameter has a bad type or value; the message names the flag or key."""


class DataError(SMoAError, ValueError):
    """Bad training data; the message names the file (and line)."""


class AdapterError(SMoAError, ValueError):
    """An adapter folder cannot be read, or does not fit the model it is applied to."""


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """The adapter folder, or a file it must hold, is missing."""


class AdapterFileError(AdapterError):
    """A file of the adapter folder is unreadable: not JSON, not a safetensors file, truncated."""


class AdapterTypeError(AdapterError):
    """The folder holds another kind of adapter (peft_type / fine_tune_type) than the one asked for."""


class MissingKeysError(AdapterError):
    """Tensors the config promises (or the format needs) are absent from the weights file."""


class ShapeMismatchError(AdapterError):
    """A tensor's shape does not fit the base model's layer (or its partner tensor)."""


class BaseModelMismatchError(AdapterError):
    """The adapter was trained on other base weights than the model it is being applied to or converted for."""


class ConversionError(SMoAError, ValueError):
    """The input cannot be converted faithfully; nothing was written."""


class UnsupportedArchitectureError(ConversionError):
    """The model family, or one of its modules, has no known Hugging Face counterpart."""


class GroupingMismatchError(ConversionError):
    """The adapter's groups differ from those the reference will recompute: no exact export exists."""


class SavePathExistsError(SMoAError, FileExistsError):
    """The output folder exists and ``--force`` was not given."""


class HubUnreachableError(SMoAError, FileNotFoundError):
    """A model was named by its Hugging Face id, the hub cannot be reached and the local cache does not hold it."""


class NoChatTemplateError(SMoAError, ValueError):
    """The tokenizer has no chat template, so a conversation cannot be rendered."""


class DiskFullError(SMoAError, OSError):
    """The disk (or quota) filled up during a write; the temporary files are removed, the previous file is intact."""


class TrainingDiverged(SMoAError, RuntimeError):
    """The loss or the adapter weights became NaN/inf; the last good checkpoint is kept."""


class FolderInUseError(SMoAError, FileExistsError):
    """Another live process holds the output folder's lock (a second training run into one adapter folder)."""


class CheckpointError(SMoAError, ValueError):
    """A training checkpoint (``training_state.safetensors``) is damaged, or names a file outside its folder."""


class ResumeMismatchError(SMoAError, ValueError):
    """``--resume`` asked for other settings than the checkpoint's run: continuing would not be that run."""
