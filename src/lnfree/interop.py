"""Interop entry points: a norm-free model (or any source `lnfree export` reads) as a TransformerLens
`TransformerBridge` or an nnsight model. The implementations live in `lnfree.export`."""

from __future__ import annotations

from .export.nnsight import to_nnsight
from .export.transformer_lens import to_transformer_lens

__all__ = ["to_nnsight", "to_transformer_lens"]
