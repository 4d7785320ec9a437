"""Model families and checkpoint I/O in the `transformers` format (safetensors preferred).

Attributes load on first use (PEP 562), so that importing `lnfree.models.names` — family names for the command line
and the presets — does not import torch and every family.
"""

from __future__ import annotations

from importlib import import_module

__all__ = ["FAMILIES", "family_of", "load_model", "save_model"]
_HOME = {"FAMILIES": ".families", "family_of": ".families", "load_model": ".io", "save_model": ".io"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(_HOME[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
