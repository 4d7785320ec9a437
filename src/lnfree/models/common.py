"""Pieces every decoder family shares: causal attention with its (optional) pattern, the pre-norm block with
TransformerLens hook names, the residual-stream components for attribution, and checked state-dict loading.
A family module composes these; what differs (projections, positions, MLP, checkpoint layout) stays there."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..method.model_sites import adopt_published_convention
from ..method.sites import RemovableLayerNorm


class RotaryEmbedding(nn.Module):
    """cos/sin of rotary positions over the first `dim` dimensions of each head, as transformers computes them:
    the default rope here, other rope types (llama3, yarn, …) through transformers' own initialisers, which read
    the model's transformers config (`hf_config()`), so scaled variants match."""

    def __init__(self, dim: int, rope: dict | None, hf_config: Callable[[], object] | None = None):
        super().__init__()
        rope = dict(rope or {})
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "default":
            theta = rope.get("rope_theta", 10000.0)
            inv_freq, self.scaling = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[kind](hf_config())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        # in float32 whatever the model's dtype, as transformers does: a float64 model then matches it exactly
        inv_freq = self.inv_freq.to(device=device, dtype=torch.float)
        freqs = torch.arange(T, device=device, dtype=torch.float)[:, None] * inv_freq  # (T, r/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, r)
        return emb.cos() * self.scaling, emb.sin() * self.scaling


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, dh); rotates its first r = cos.shape[-1] dimensions (transformers' rotate_half convention;
    GPT-NeoX's partial rotary leaves the rest as they are)."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotated if x_pass.shape[-1] == 0 else torch.cat((rotated, x_pass), dim=-1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, cache: dict | None, prefix: str) -> Tensor:
    """q, k, v: (B, H, T, dh) → z: (B, T, H, dh). The attention pattern is only materialised when someone asks
    to look at it (cache given), under `{prefix}attn.hook_pattern`."""
    z = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, H, T, dh)
    if cache is not None:
        T = q.shape[-2]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        cache[prefix + "attn.hook_pattern"] = scores.masked_fill(causal, float("-inf")).softmax(-1)
    return z.transpose(1, 2)


def pre_norm_block(x: Tensor, eot_mask: Tensor | None, cache: dict | None, prefix: str,
                   ln1: RemovableLayerNorm | None, attend: Callable[[Tensor, Tensor], Tensor], out_proj: nn.Module,
                   ln2: RemovableLayerNorm | None, mlp: nn.Module, out_dropout: float = 0.0) -> Tensor:
    """x + attn(ln1(x)), then + mlp(ln2(·)); ln_1 feeds Q/K and V from its two paths (the same tensor once
    folded). `attend(x_qk, x_v)` returns z (B, T, H, dh); `out_dropout` drops the attention output (callers pass
    0 outside training).
    Fills the cache with TransformerLens names: hook_resid_pre, attn.hook_z, hook_attn_out, hook_resid_mid,
    hook_mlp_out, hook_resid_post."""
    x_qk, x_v = ln1(x, eot_mask) if ln1 is not None else (x, x)
    z = attend(x_qk, x_v)  # (B, T, H, dh)
    attn_out = F.dropout(out_proj(z.flatten(2)), out_dropout, out_dropout > 0)
    resid_mid = x + attn_out
    mlp_out = mlp(ln2(resid_mid, eot_mask)[0] if ln2 is not None else resid_mid)
    resid_post = resid_mid + mlp_out
    if cache is not None:
        cache.update({prefix + "hook_resid_pre": x, prefix + "attn.hook_z": z, prefix + "hook_attn_out": attn_out,
                      prefix + "hook_resid_mid": resid_mid, prefix + "hook_mlp_out": mlp_out,
                      prefix + "hook_resid_post": resid_post})
    return resid_post


def rotary_decoder(model: nn.Module, x: Tensor, layers: nn.ModuleList, rotary: RotaryEmbedding,
                   final_norm: RemovableLayerNorm | None, eot_mask: Tensor | None,
                   cache: dict | None) -> tuple[Tensor, Tensor]:
    """Embedded tokens (B, T, D) through every layer (each gets the rotary cos/sin) and the final norm: returns
    (final residual, normalised output) and caches `ln_final.hook_normalized`."""
    cos, sin = rotary(x.shape[1], x.device)
    rope = (cos.to(x.dtype), sin.to(x.dtype))
    for layer in layers:
        x = model.run_block(layer, x, rope, eot_mask, cache=cache)
    final = final_norm(x, eot_mask)[0] if final_norm is not None else x
    if cache is not None:
        cache["ln_final.hook_normalized"] = final
    return x, final


def linear_weights(linear: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) that `linear` applies, for a family that slices the rows of a packed projection (GPT-2's
    c_attn, NeoX's query_key_value) instead of calling it: a LoRA wrapper's update (peft's `lora.Linear`, see
    run/lora.py) is added to its base weight, so slicing keeps the adapter in the computation."""
    base = getattr(linear, "base_layer", linear)
    weight = base.weight
    if base is not linear and not linear.merged:
        for name in linear.active_adapters:
            weight = weight + linear.get_delta_weight(name)
    return weight, base.bias


def stack_components(cache: dict[str, Tensor], embeds: list[str], out_projs: list[nn.Linear],
                     n_head: int) -> tuple[list[str], Tensor]:
    """Every write to the final residual stream, (N, B, T, D): the named embedding hooks, each head's z · W_O
    per layer, each MLP's output, and the attention output biases summed into one component."""
    names, parts = [e.removeprefix("hook_") for e in embeds], [cache[e] for e in embeds]
    D = parts[0].shape[-1]
    bias = torch.zeros(D, dtype=parts[0].dtype, device=parts[0].device)
    for layer, proj in enumerate(out_projs):
        z = cache[f"blocks.{layer}.attn.hook_z"]  # (B, T, H, dh)
        w_o = proj.weight.view(D, n_head, z.shape[-1])  # (D, H·dh) → (D, H, dh)
        parts += list(torch.einsum("bthd,mhd->hbtm", z, w_o))  # H × (B, T, D)
        names += [f"L{layer}H{h}" for h in range(n_head)]
        parts.append(cache[f"blocks.{layer}.hook_mlp_out"])
        names.append(f"L{layer}MLP")
        if proj.bias is not None:
            bias = bias + proj.bias
    parts.append(bias.expand_as(parts[0]))
    names.append("attn_biases")
    return names, torch.stack(parts)


def init_normal(model: nn.Module, seed: int = 0) -> nn.Module:
    """transformers' initialisation of Llama- and NeoX-style models: normal(0, 0.02) for every matrix and
    embedding, norm gains 1, biases 0 (for pretraining the offline analogs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def hf_state(model: nn.Module, body_prefix: str) -> dict[str, Tensor]:
    """Our state dict in transformers' keys: σ̂ buffers and rotary tables dropped, the body under `body_prefix`
    (e.g. "model."), the head at the top."""
    return {(k if k.startswith("lm_head.") else body_prefix + k): t.contiguous()
            for k, t in model.state_dict().items() if ".sites." not in k and not k.startswith("rotary.")}


def load_checked(model: nn.Module, state: dict[str, Tensor], what: str, norm_eps: float) -> None:
    """Load a state dict already mapped to our keys: every tensor known and of the right shape, every parameter
    present (σ̂ buffers keep their defaults: transformers checkpoints have none). A model with norms whose eps is
    the published LN-free convention's is read as frozen (`model_sites.adopt_published_convention`)."""
    ours = model.state_dict()
    for key, tensor in state.items():
        if key not in ours:
            raise ValueError(f"unexpected tensor {key!r} in a {what} checkpoint")
        if tensor.shape != ours[key].shape:
            raise ValueError(f"shape mismatch for {key!r}: checkpoint {tuple(tensor.shape)}, "
                             f"config expects {tuple(ours[key].shape)}")
    missing = sorted({k for k, _ in model.named_parameters()} - state.keys())
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
    model.load_state_dict(state, strict=False)
    if model.has_normalization:
        adopt_published_convention(model, norm_eps)
