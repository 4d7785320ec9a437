"""The model families lnfree reads: one module each (gpt2, llama, neox), registered here by name, and the one
function that picks a family from a `transformers` config.json."""

from __future__ import annotations

from .base import Family
from .gpt2 import GPT2_FAMILY
from .llama import LLAMA_FAMILY
from .names import FAMILY_NAMES
from .neox import NEOX_FAMILY

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2_FAMILY, LLAMA_FAMILY, NEOX_FAMILY)}
assert tuple(FAMILIES) == FAMILY_NAMES, "models/names.py lists the families registered here"


def family_of(hf_config: dict) -> Family:
    """The family that reads this config.json, or a one-line error naming what was found and what works."""
    archs = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    for family in FAMILIES.values():
        if any(a in family.architectures for a in archs) or (not archs and model_type in family.model_types):
            return family
    supported = sorted(a for f in FAMILIES.values() for a in f.architectures)
    found = ", ".join(archs) or f"model_type={model_type!r}"
    raise ValueError(f"unsupported model architecture {found}; supported: {', '.join(supported)}")
