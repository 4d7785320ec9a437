"""TransformerLens 4.x interop: a `TransformerBridge` around the norm-free model, exact and with standard hooks.

TransformerLens 4.3 removed `HookedTransformer`; its `TransformerBridge` wraps a transformers model. Measured
facts that shape this module (see shared/docs/interop.md):
  * the stock GPT-2 adapter's `NormalizationBridge` recomputes LayerNorm from the wrapped module's weight and
    `cfg.eps` — on `nn.Identity` norms it fails ("no attribute 'weight'"), and on an eps=1e12 checkpoint whose
    config says 1e-5 it is silently wrong;
  * with `use_native_layernorm_autograd = True` the bridge calls the wrapped module itself and has an
    explicit `nn.Identity` branch (hook_scale = 1, hook_normalized = input);
  * architecture detection reads a static table, so a custom architecture name cannot get an adapter of its
    own without patching TransformerLens globals.

What we do: resolve the source with our own loader (a published eps=1e12 model is read as frozen sites and
folded, never fed to the bridge's LN recomputation), build the family's norm-free transformers class (GPT-2:
`LNFreeGPT2LMHeadModel`, its modules with Identity norms and an untied head with bias), boot the stock adapter of
the family's architecture on it — selected through boot's own `hf_config_overrides={"original_architecture":
…}` on the bridge's config copy — then switch every `NormalizationBridge` to the native path and set
`cfg.normalization_type = None`. Measured: exact for GPT-2, GPT-NeoX, Llama, Qwen2 and Qwen3 (tests).
That last step tells `ActivationCache.apply_ln_to_stack` that there is nothing to centre or scale, so
`decompose_resid` / `accumulated_resid` / `stack_head_results` with `apply_ln=True` stay exact sums.
We chose this over registering a `GPT2ArchitectureAdapter` subclass because it uses only boot's public
arguments and a documented constructor flag, and leaves TransformerLens' tables untouched for other models.

Do not call `bridge.enable_compatibility_mode()` with weight processing: it centres the unembedding and the
writing weights, which changes a model whose readers do not ignore the residual mean (no_processing=True
keeps it exact).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..models import FAMILIES
from ..models.base import LNModel
from .core import resolve
from .hf import to_hf_model

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def to_transformer_lens(model_or_path: LNModel | str | os.PathLike, tokenizer: Any = None,
                        device: str = "cpu") -> TransformerBridge:
    """A TransformerLens `TransformerBridge` computing exactly our norm-free model's logits.

    model_or_path: one of our models (folded here if all its sites are frozen) or any source
    `lnfree export` reads (folded export, published eps=1e12 model, run folder). tokenizer: a tokenizer, or
    its folder / hub id; by default the model folder's own. device: where the model runs. Hook names are
    TransformerLens' standard ones (hook_embed, blocks.{i}.hook_resid_pre, blocks.{i}.attn.hook_z, …);
    every norm hook is an identity.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.generalized_components import NormalizationBridge

    model, tok = resolve(model_or_path, tokenizer)
    family = FAMILIES[model.family].hf()
    hf_model = to_hf_model(model).to(device)  # boot rewires this object in place: always a fresh one
    name = str(model_or_path) if not isinstance(model_or_path, LNModel) else getattr(model_or_path, "source",
                                                                                      "lnfree-model")
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tok, device=device,
        hf_config_overrides={"original_architecture": family.classes(model)[2]})
    norms = [m for m in bridge.modules() if isinstance(m, NormalizationBridge)]
    if len(norms) != family.tl_norm_count(model):
        raise RuntimeError(f"expected {family.tl_norm_count(model)} norm bridges, found {len(norms)}; "
                           f"TransformerLens' {family.classes(model)[2]} adapter changed")
    for norm in norms:
        norm.use_native_layernorm_autograd = True  # call our nn.Identity instead of recomputing a LayerNorm
    bridge.cfg.normalization_type = None  # nothing to centre or scale in apply_ln_to_stack
    return bridge
