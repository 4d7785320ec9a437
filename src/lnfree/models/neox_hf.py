"""GPT-NeoX in `transformers` without normalization: the family's `hf` and `hf-compat` classes.

`LNFreeGPTNeoXForCausalLM` is transformers' own `GPTNeoXForCausalLM` with every LayerNorm an `nn.Identity`, Q/K/V
biases (where a folded β lands) and a head with a bias (the folded final norm). `to_compat_hf` writes the stock
class in the eps=1e12 convention: each LayerNorm then only centres. The head stays the stock bias-free
`lm_head`, so the final norm carries the folded head bias b: with the final norm x ↦ C x + 1/D (gain 1e6, bias 1/D
in every channel) and lm_head = W' + b 1ᵀ, the logits are W' C x + W' 1/D + b 1ᵀ C x + b = W' x + b, exactly
(W' = W diag(g) C gives W' C = W' and W' 1 = 0; 1ᵀ C = 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from ..method.fold import WIDE_COMPAT_EPS
from .neox import ARCHITECTURE, NOLN_ARCHITECTURE, NOLN_MODEL_TYPE, NeoX, config_to_hf, to_hf

__all__ = ["LNFreeGPTNeoXConfig", "LNFreeGPTNeoXForCausalLM", "classes", "register", "to_compat_hf",
           "to_hf_model", "tl_norm_count"]


class LNFreeGPTNeoXConfig(GPTNeoXConfig):
    model_type = NOLN_MODEL_TYPE
    normalization: bool = False


class LNFreeGPTNeoXForCausalLM(GPTNeoXForCausalLM):
    """GPTNeoXForCausalLM whose LayerNorms are identities, with Q/K/V biases and a head bias."""

    config_class = LNFreeGPTNeoXConfig

    def __init__(self, config: LNFreeGPTNeoXConfig):
        super().__init__(config)
        D = config.hidden_size
        for layer in self.gpt_neox.layers:
            layer.input_layernorm = nn.Identity()
            layer.post_attention_layernorm = nn.Identity()
            if layer.attention.query_key_value.bias is None:
                layer.attention.query_key_value = nn.Linear(D, 3 * D, bias=True)
        self.gpt_neox.final_layer_norm = nn.Identity()
        self.lm_head = nn.Linear(D, config.vocab_size, bias=True)
        self.post_init()


def classes(model: NeoX) -> tuple[str, str, str]:
    return NOLN_ARCHITECTURE, ARCHITECTURE, ARCHITECTURE


def register() -> None:
    AutoConfig.register(NOLN_MODEL_TYPE, LNFreeGPTNeoXConfig, exist_ok=True)
    AutoModelForCausalLM.register(LNFreeGPTNeoXConfig, LNFreeGPTNeoXForCausalLM, exist_ok=True)


def _build(model_cls: type, config_cls: type, hf_config: dict) -> nn.Module:
    config = config_cls(**{k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")})
    config.architectures = hf_config["architectures"]
    return model_cls(config).eval()


def to_hf_model(model: NeoX) -> LNFreeGPTNeoXForCausalLM:
    hf_config, state = to_hf(model)
    out = _build(LNFreeGPTNeoXForCausalLM, LNFreeGPTNeoXConfig, hf_config)
    missing, unexpected = out.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"LNFreeGPTNeoXForCausalLM layout drifted: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return out


@torch.no_grad()
def to_compat_hf(model: NeoX, eps: float = WIDE_COMPAT_EPS) -> GPTNeoXForCausalLM:
    """Folded model → a stock GPTNeoXForCausalLM, every LayerNorm eps = 1e12 and gain 1e6 (fp32, eval)."""
    if model.has_normalization:
        raise ValueError("hf-compat export needs a norm-free (folded) model; call model.fold() first")
    from dataclasses import replace

    cfg = model.config
    hf_config = config_to_hf(replace(cfg, normalization=True, attention_bias=True))  # Q/K/V carry the folded β
    hf_config.update(layer_norm_eps=eps)
    out = _build(GPTNeoXForCausalLM, GPTNeoXConfig, hf_config)
    state = {k: v.float() for k, v in to_hf(model)[1].items() if not k.startswith("lm_head.")}
    missing, unexpected = out.load_state_dict(state, strict=False)
    if unexpected or any("norm" not in k and "dense.bias" not in k and k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"GPT-NeoX layout drifted: missing {missing[:3]}, unexpected {unexpected[:3]}")
    unit, D = math.sqrt(eps), cfg.hidden_size
    for layer in out.gpt_neox.layers:
        for ln in (layer.input_layernorm, layer.post_attention_layernorm):
            ln.weight.fill_(unit)
            ln.bias.zero_()
        if not cfg.attention_bias:
            layer.attention.dense.bias.zero_()
    ln_f = out.gpt_neox.final_layer_norm
    ln_f.weight.fill_(unit)
    ln_f.bias.fill_(1.0 / D)  # ln_f(x) = C x + 1/D, and lm_head · (1/D) = b
    out.lm_head.weight.copy_(model.lm_head.weight + model.lm_head.bias[:, None])
    return out


def tl_norm_count(model: NeoX) -> int:
    return 2 * model.config.num_hidden_layers + 1


register()
