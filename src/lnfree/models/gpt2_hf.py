"""GPT-2 in `transformers` without normalization: the family's classes for the `hf` and `hf-compat` exports.

`LNFreeGPT2LMHeadModel` is transformers' own `GPT2LMHeadModel` with every LayerNorm replaced by `nn.Identity` and
an untied `lm_head` with a bias (where the folded final norm lives); its checkpoint keys and Conv1D (in, out)
layouts are exactly those `lnfree.models.save_model` writes for a folded model (`architectures:
["LNFreeGPT2LMHeadModel"]`, `model_type: "lnfree_gpt2"`). It registers with the Auto classes when this module is
imported, which `lnfree.export` arranges (see export/hf.py for why registration works that way). `to_compat_hf`
writes the published eps=1e12 convention into a stock `GPT2LMHeadModel` (see export/compat.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from ..method.fold import COMPAT_EPS, TIE_RTOL, HeadNotTiedError, untie_head
from .gpt2 import GPT2, NOLN_ARCHITECTURE, NOLN_MODEL_TYPE, to_hf

__all__ = ["LNFreeGPT2Config", "LNFreeGPT2LMHeadModel", "classes", "register", "to_hf_model", "to_compat_hf",
           "tl_norm_count"]


def classes(model: GPT2) -> tuple[str, str, str]:
    """(what the `hf` export reloads as, what `hf-compat` reloads as, the TransformerLens adapter to boot)."""
    return NOLN_ARCHITECTURE, "GPT2LMHeadModel", "GPT2LMHeadModel"


class LNFreeGPT2Config(GPT2Config):
    """GPT-2's config under its own model_type; the head is untied and nothing normalises."""

    model_type = NOLN_MODEL_TYPE
    tie_word_embeddings: bool = False
    normalization: bool = False


class LNFreeGPT2LMHeadModel(GPT2LMHeadModel):
    """GPT2LMHeadModel whose ln_1 / ln_2 / ln_f are identities and whose lm_head is untied, with a bias."""

    config_class = LNFreeGPT2Config
    _tied_weights_keys: dict[str, str] = {}  # the head is a separate, folded matrix

    def __init__(self, config: LNFreeGPT2Config):
        super().__init__(config)
        for block in self.transformer.h:
            block.ln_1 = nn.Identity()
            block.ln_2 = nn.Identity()
        self.transformer.ln_f = nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=True)  # (V, D) + (V,)
        self.post_init()


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` resolve model_type `lnfree_gpt2` (idempotent)."""
    AutoConfig.register(NOLN_MODEL_TYPE, LNFreeGPT2Config, exist_ok=True)
    AutoModelForCausalLM.register(LNFreeGPT2Config, LNFreeGPT2LMHeadModel, exist_ok=True)


def to_hf_model(model: GPT2) -> LNFreeGPT2LMHeadModel:
    """Our folded GPT-2 → an equivalent `LNFreeGPT2LMHeadModel` in memory (fp32 copy of the weights, eval)."""
    if model.has_normalization:
        raise ValueError("to_hf_model needs a norm-free (folded) model; call model.fold() first")
    hf_config, state = to_hf(model)
    config = LNFreeGPT2Config(**{k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")})
    config.architectures = [NOLN_ARCHITECTURE]
    out = LNFreeGPT2LMHeadModel(config).eval()
    missing, unexpected = out.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    # transformers' GPT-2 keeps no persistent buffers, so every parameter must come from our state dict.
    if missing or unexpected:
        raise RuntimeError(f"LNFreeGPT2LMHeadModel layout drifted: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return out


@torch.no_grad()
def to_compat_hf(model: GPT2, eps: float = COMPAT_EPS) -> GPT2LMHeadModel:
    """Folded GPT-2 → a stock `GPT2LMHeadModel` (tied head, every LN eps=1e12 / weight 1e6), fp32, eval.

    Raises HeadNotTiedError when the folded head cannot be expressed through the tied embedding.
    """
    if model.has_normalization:
        raise ValueError("hf-compat export needs a norm-free (folded) model; call model.fold() first")
    cfg = model.config
    g, beta, residual = untie_head(model.wte.weight, model.lm_head.weight, model.lm_head.bias)
    if not residual <= TIE_RTOL:
        raise HeadNotTiedError(f"hf-compat needs the lm_head to be the folded tied embedding (wte·diag(g)·C); "
                               f"this head differs from that by {residual:.1e} (relative), so a GPT-2 with a "
                               "tied head cannot express it; use --format hf")
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner,
                        activation_function=cfg.activation_function, layer_norm_epsilon=eps,
                        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    hf_cfg.architectures = ["GPT2LMHeadModel"]
    out = GPT2LMHeadModel(hf_cfg).eval()
    unit = math.sqrt(eps)  # LN weight that cancels the 1/sqrt(eps) divisor
    t = out.transformer
    t.wte.weight.copy_(model.wte.weight)
    t.wpe.weight.copy_(model.wpe.weight)
    for src, dst in zip(model.h, t.h, strict=True):
        for ln in (dst.ln_1, dst.ln_2):
            ln.weight.fill_(unit)
            ln.bias.zero_()
        # nn.Linear (out, in) → Conv1D (in, out)
        for a, b in ((src.attn.c_attn, dst.attn.c_attn), (src.attn.c_proj, dst.attn.c_proj),
                     (src.mlp.c_fc, dst.mlp.c_fc), (src.mlp.c_proj, dst.mlp.c_proj)):
            b.weight.copy_(a.weight.t())
            b.bias.copy_(a.bias)
    t.ln_f.weight.copy_((g * unit).to(t.ln_f.weight.dtype))
    t.ln_f.bias.copy_(beta.to(t.ln_f.bias.dtype))
    return out


def tl_norm_count(model: GPT2) -> int:
    """How many NormalizationBridges TransformerLens' GPT-2 adapter puts on this model (ln_1, ln_2, ln_f)."""
    return 2 * model.config.n_layer + 1


register()
