"""Model families and checkpoint I/O in the `transformers` format (safetensors preferred)."""

from .io import FAMILIES, family_of, load_model, save_model

__all__ = ["FAMILIES", "family_of", "load_model", "save_model"]
