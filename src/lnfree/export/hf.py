"""The `hf` export format: a clean LN-free checkpoint that plain `transformers` loads.

Each family defines its norm-free class in its own module and registers it (GPT-2: `LNFreeGPT2LMHeadModel` in
`lnfree.models.gpt2_hf`, transformers' own `GPT2LMHeadModel` with every LayerNorm an `nn.Identity` and an untied
`lm_head` with a bias, where the folded final norm lives). Subclassing keeps transformers' attention, MLP,
generation and weight loading; the checkpoint keys are exactly those `lnfree.models.save_model` writes for a
folded model, so one file serves both loaders. This module registers every family and dispatches to it.

Why register the class with `AutoConfig` / `AutoModelForCausalLM` from `import lnfree`:
  * `trust_remote_code` + `auto_map` would put a modelling file in every checkpoint and execute code from it;
    the brief (and `lnfree.models.io`) rule that out.
  * transformers has no plugin entry point for Auto classes, so registration must run in-process.
  * an explicit `lnfree.export.hf.register()` call is easy to forget, and `from_pretrained` then fails with
    "model type lnfree_gpt2 not recognised".
  * registering eagerly inside `lnfree/__init__.py` would import transformers' modelling stack on every
    `import lnfree` — measured +3.5 s here (`lnfree schedule` 0.12 s → 5 s).
So `lnfree.export` installs a post-import hook: this module is imported (and registers) as soon as transformers'
Auto machinery has finished loading, or at once if it already has. After `import lnfree`,
`AutoModelForCausalLM.from_pretrained(DIR)` just works; nothing transformers-related is imported until needed.
"""

from __future__ import annotations

from typing import Any

from ..models import FAMILIES
from ..models.base import LNModel

__all__ = ["register", "to_hf_model"]


def register() -> None:
    """Register every family's norm-free class with transformers' Auto classes (each module does at import)."""
    for family in FAMILIES.values():
        family.hf()


def to_hf_model(model: LNModel) -> Any:
    """Our folded model → its family's equivalent norm-free transformers model in memory (fp32, eval)."""
    if model.has_normalization:
        raise ValueError("to_hf_model needs a norm-free (folded) model; call model.fold() first")
    return FAMILIES[model.family].hf().to_hf_model(model)


register()
