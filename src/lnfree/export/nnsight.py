"""nnsight interop: trace, read and edit the norm-free model's activations.

nnsight wraps a transformers model, so we hand it the family's in-memory norm-free class (the stock module tree,
e.g. GPT-2's `transformer.h[i]`, `lm_head`; the norms are identities) together with a tokenizer — without one
nnsight cannot guess a tokenizer for a pre-built model. nnsight 0.8 deprecates `LanguageModel` in favour of
`TransformersModel(…, task="text-generation")`, of which `LanguageModel` is now a warning-only subclass; we
use `TransformersModel` where it exists and fall back to `LanguageModel` on older nnsight (≥ 0.4).

nnsight finds the body of a `with model.trace(...)` block by reading source files, so trace code must live in a
file (not a heredoc or `python -c`).
"""

from __future__ import annotations

import os
from typing import Any

from ..models.base import LNModel
from .core import resolve
from .hf import to_hf_model


def to_nnsight(model_or_path: LNModel | str | os.PathLike, tokenizer: Any = None) -> Any:
    """An nnsight model around the norm-free model (see `to_transformer_lens` for the accepted sources)."""
    model, tok = resolve(model_or_path, tokenizer)
    hf_model = to_hf_model(model)
    try:
        from nnsight.modeling.transformers import TransformersModel
    except ImportError:  # nnsight < 0.8
        from nnsight import LanguageModel

        return LanguageModel(hf_model, tokenizer=tok)
    return TransformersModel(hf_model, tokenizer=tok, task="text-generation")
