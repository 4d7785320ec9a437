"""Llama, Qwen2 and Qwen3 in `transformers` without normalization: the family's `hf` and `hf-compat` classes.

`LNFreeLlamaForCausalLM` / `LNFreeQwen2ForCausalLM` are transformers' own classes with every RMSNorm an
`nn.Identity` and an untied head; a folded RMSNorm adds no bias anywhere, so the checkpoint keys are exactly the
stock ones. They register with the Auto classes when this module is imported (`lnfree.export` arranges it, see
export/hf.py). `to_compat_hf` writes the stock class with rms_norm_eps = 1e12 and gains 1e6: each RMSNorm then
multiplies by 1e6 / sqrt(mean(x²) + 1e12) = 1 − mean(x²)/2e12 + …, an identity to that relative error; a tied
head keeps its tie, with the folded final gain γ/σ̂ (recovered column by column) on the final norm.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ..method.fold import TIE_RTOL, WIDE_COMPAT_EPS, HeadNotTiedError
from .llama import NOLN_PREFIX, Llama, config_to_hf, to_hf

__all__ = ["classes", "register", "to_compat_hf", "to_hf_model", "tl_norm_count"]

_STOCK = {"LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM), "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM),
          "Qwen3ForCausalLM": (Qwen3Config, Qwen3ForCausalLM)}


def _norm_free_classes(arch: str) -> tuple[type, type]:
    config_cls, model_cls = _STOCK[arch]

    class NormFreeConfig(config_cls):
        model_type = f"lnfree_{config_cls.model_type}"
        tie_word_embeddings: bool = False
        normalization: bool = False

    class NormFreeModel(model_cls):
        config_class = NormFreeConfig
        _tied_weights_keys: dict[str, str] = {}  # the head is a separate, folded matrix

        def __init__(self, config):
            super().__init__(config)
            for layer in self.model.layers:
                layer.input_layernorm = nn.Identity()
                layer.post_attention_layernorm = nn.Identity()
                if hasattr(layer.self_attn, "q_norm"):  # Qwen3's per-head norms
                    layer.self_attn.q_norm = nn.Identity()
                    layer.self_attn.k_norm = nn.Identity()
            self.model.norm = nn.Identity()
            self.post_init()

    NormFreeConfig.__name__ = NormFreeConfig.__qualname__ = f"{NOLN_PREFIX}{config_cls.__name__}"
    NormFreeModel.__name__ = NormFreeModel.__qualname__ = NOLN_PREFIX + arch
    return NormFreeConfig, NormFreeModel


NORM_FREE = {arch: _norm_free_classes(arch) for arch in _STOCK}


def classes(model: Llama) -> tuple[str, str, str]:
    arch = model.config.architecture
    return NOLN_PREFIX + arch, arch, arch


def register() -> None:
    for config_cls, model_cls in NORM_FREE.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def _build(model_cls: type, config_cls: type, hf_config: dict) -> nn.Module:
    config = config_cls(**{k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")})
    config.architectures = hf_config["architectures"]
    return model_cls(config).eval()


def to_hf_model(model: Llama) -> nn.Module:
    """Our folded model → the equivalent norm-free transformers model in memory (fp32, eval)."""
    hf_config, state = to_hf(model)
    config_cls, model_cls = NORM_FREE[model.config.architecture]
    out = _build(model_cls, config_cls, hf_config)
    missing, unexpected = out.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{model_cls.__name__} layout drifted: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return out


@torch.no_grad()
def to_compat_hf(model: Llama, eps: float = WIDE_COMPAT_EPS) -> nn.Module:
    """Folded model → the stock class with rms_norm_eps = 1e12 and norm gains 1e6 (fp32, eval). A model whose
    original head was tied keeps it tied: the final norm carries the folded gain γ/σ̂ · 1e6."""
    if model.has_normalization:
        raise ValueError("hf-compat export needs a norm-free (folded) model; call model.fold() first")
    cfg = model.config
    hf_config = config_to_hf(replace(cfg, normalization=True))  # the stock architecture, tied as it was
    hf_config.update(rms_norm_eps=eps)
    config_cls, model_cls = _STOCK[cfg.architecture]
    out = _build(model_cls, config_cls, hf_config)
    unit = math.sqrt(eps)
    state = {k.removeprefix("model."): v for k, v in to_hf(model)[1].items()}
    body = {k: v.float() for k, v in state.items() if not k.startswith("lm_head.")}
    final_gain = torch.full((cfg.hidden_size,), unit)
    if cfg.tie_word_embeddings:
        emb, head = model.embed_tokens.weight.double(), model.lm_head.weight.double()  # head = emb · diag(g)
        g = (emb * head).sum(0) / (emb * emb).sum(0)
        residual = ((emb * g - head).abs().max() / head.abs().max().clamp_min(1e-30)).item()
        if not residual <= TIE_RTOL:
            raise HeadNotTiedError(f"hf-compat keeps this model's tied head, but the folded head differs from "
                                   f"embed_tokens · diag(g) by {residual:.1e} (relative); use --format hf")
        final_gain = g * unit
    else:
        out.lm_head.weight.copy_(model.lm_head.weight)
    missing, unexpected = out.model.load_state_dict(body, strict=False)
    if unexpected or any("norm" not in k for k in missing):
        raise RuntimeError(f"{cfg.architecture} layout drifted: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for layer in out.model.layers:
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [getattr(layer.self_attn, n) for n in ("q_norm", "k_norm") if hasattr(layer.self_attn, n)]
        for norm in norms:
            norm.weight.fill_(unit)
    out.model.norm.weight.copy_(final_gain.to(out.model.norm.weight.dtype))
    return out


def tl_norm_count(model: Llama) -> int:
    """Norm bridges TransformerLens' adapter creates: two per layer and the final one (Qwen3: + q/k norms)."""
    return (4 if model.config.qk_norm else 2) * model.config.num_hidden_layers + 1


register()
