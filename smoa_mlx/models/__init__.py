"""Models the project ships or reads itself: the embedded default (SmolLM2-135M-Instruct from a GGUF)."""

from .embedded import EMBEDDED_NAME, embedded_gguf_path, gguf_model, load_embedded, save_embedded
from .folder import save_model_folder
from .gguf import llamacpp_permute, llamacpp_unpermute

__all__ = [
    "EMBEDDED_NAME",
    "embedded_gguf_path",
    "gguf_model",
    "llamacpp_permute",
    "llamacpp_unpermute",
    "load_embedded",
    "save_embedded",
    "save_model_folder",
]
