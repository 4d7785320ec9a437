"""GPT-NeoX family (Pythia): LayerNorm with bias, parallel residual (attention and MLP read separate norms of the
same input), partial rotary positions, Q/K/V packed per head, an untied unembedding — with removable LayerNorms,
and its `transformers` mapping (`GPTNeoXForCausalLM`).

Sites are the standard layout: `blocks.{i}.ln1.qk` / `.ln1.v` (input_layernorm, read by Q/K and by V),
`blocks.{i}.ln2` (post_attention_layernorm, which reads the block's input when the residual is parallel), and
`ln_final` (final_layer_norm). The folded model is the stock architecture with identity norms, Q/K/V and MLP
biases carrying the folded β, and a head with a bias (`LNFreeGPTNeoXForCausalLM`). Hooks: with the parallel
residual there is no `hook_resid_mid`: resid_post = resid_pre + attn_out + mlp_out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..method.fold import NormRead
from ..method.sites import RemovableLayerNorm
from .base import Family, LNModel
from .common import (
    RotaryEmbedding,
    causal_attention,
    hf_state,
    init_normal,
    linear_weights,
    load_checked,
    pre_norm_block,
    rotary_decoder,
    rotate,
    stack_components,
)

ARCHITECTURE, NOLN_ARCHITECTURE, NOLN_MODEL_TYPE = "GPTNeoXForCausalLM", "LNFreeGPTNeoXForCausalLM", "lnfree_gpt_neox"
_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_fast": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass
class NeoXConfig:
    vocab_size: int = 50432
    hidden_size: int = 6144
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    intermediate_size: int = 24576
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0,
                                                            "partial_rotary_factor": 0.25})
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    normalization: bool = True  # False: folded, norm-free, head with bias

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))


class Attention(nn.Module):
    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.num_attention_heads, cfg.head_dim
        bias = cfg.attention_bias or not cfg.normalization  # a folded LN's β lands in these biases
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=bias)  # rows: per head q|k|v
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.dropout_p = 0.0  # on the attention weights in training, as transformers' attention_dropout

    def packed(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """(W_qk, b_qk, W_v, b_v): the rows of the per-head packed projection that Q/K and V read."""
        H, dh = self.n_head, self.d_head
        w, b = linear_weights(self.query_key_value)
        w = w.view(H, 3, dh, -1)
        b = b.view(H, 3, dh) if b is not None else None
        flat = lambda t: t.reshape(-1, t.shape[-1]) if t.dim() == 4 else t.reshape(-1)
        return (flat(w[:, :2]), None if b is None else flat(b[:, :2]), flat(w[:, 2:]),
                None if b is None else flat(b[:, 2:]))

    def forward(self, x_qk: Tensor, x_v: Tensor, cos: Tensor, sin: Tensor, cache: dict | None = None,
                prefix: str = "") -> Tensor:
        """x_qk, x_v: (B, T, D) → z: (B, T, H, dh)."""
        B, T, _ = x_qk.shape
        H, dh = self.n_head, self.d_head
        if x_qk is x_v:  # one input: one matmul, as transformers does
            q, k, v = self.query_key_value(x_qk).view(B, T, H, 3 * dh).chunk(3, dim=-1)  # (B, T, H, dh) each
        else:  # Q/K and V read different norm outputs: the packed rows apart
            w_qk, b_qk, w_v, b_v = self.packed()
            q, k = F.linear(x_qk, w_qk, b_qk).view(B, T, H, 2 * dh).chunk(2, dim=-1)
            v = F.linear(x_v, w_v, b_v).view(B, T, H, dh)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, dh)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return causal_attention(q, k, v, self.dropout_p if self.training else 0.0, cache, prefix)


class MLP(nn.Module):
    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) → (B, T, D)
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, cfg: NeoXConfig, i: int):
        super().__init__()
        self.i, self.parallel = i, cfg.use_parallel_residual
        eps, D, norm = cfg.layer_norm_eps, cfg.hidden_size, cfg.normalization
        self.input_layernorm = RemovableLayerNorm(D, eps, ("ln1qk", "ln1v"), i) if norm else None
        self.post_attention_layernorm = RemovableLayerNorm(D, eps, ("ln2",), i) if norm else None
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)
        self.dropout_p = 0.0  # on both residual writes in training, as transformers' hidden_dropout

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], eot_mask: Tensor | None,
                cache: dict | None) -> Tensor:  # (B, T, D)
        prefix, attn, p = f"blocks.{self.i}.", self.attention, self.dropout_p if self.training else 0.0
        attend = lambda a, b: attn(a, b, *rope, cache, prefix)
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        if not self.parallel:
            mlp = lambda h: F.dropout(self.mlp(h), p, p > 0)
            return pre_norm_block(x, eot_mask, cache, prefix, ln1, attend, attn.dense, ln2, mlp, p)
        x_qk, x_v = ln1(x, eot_mask) if ln1 is not None else (x, x)
        z = attend(x_qk, x_v)  # (B, T, H, dh)
        attn_out = F.dropout(attn.dense(z.flatten(2)), p, p > 0)
        mlp_out = F.dropout(self.mlp(ln2(x, eot_mask)[0] if ln2 is not None else x), p, p > 0)
        resid_post = x + attn_out + mlp_out
        if cache is not None:
            cache.update({prefix + "hook_resid_pre": x, prefix + "attn.hook_z": z, prefix + "hook_attn_out": attn_out,
                          prefix + "hook_mlp_out": mlp_out, prefix + "hook_resid_post": resid_post})
        return resid_post


class NeoX(LNModel):
    family = "gpt_neox"

    def __init__(self, cfg: NeoXConfig):
        super().__init__()
        self.config = cfg
        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_parameters, lambda: _hf_config_object(cfg))
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layer_norm = (RemovableLayerNorm(cfg.hidden_size, cfg.layer_norm_eps, ("ln_final",))
                                 if cfg.normalization else None)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=not cfg.normalization)
        self.dropout_p = 0.0  # unused: GPT-NeoX drops no embeddings

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def forward(self, idx: Tensor, *, cache: dict | None = None, return_final_std: bool = False):
        """idx: (B, T) token ids → logits (B, T, V); with return_final_std also the final norm's input std (B, T)."""
        B, T = idx.shape
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.context_length}")
        eot_mask = self.eot_mask(idx)
        x = self.embed_in(idx)  # (B, T, D)
        if cache is not None:
            cache["hook_embed"] = x
        ln_f = self.final_layer_norm
        x, final = rotary_decoder(self, x, self.layers, self.rotary, ln_f, eot_mask, cache)
        logits = self.lm_head(final)  # (B, T, V)
        if return_final_std:
            std = ln_f.input_std(x) if ln_f is not None else x.std(-1, correction=0)
            return logits, std
        return logits

    def residual_components(self, cache: dict[str, Tensor]) -> tuple[list[str], Tensor]:
        """The embedding, each head (z · W_O), each MLP, and the attention output biases summed."""
        return stack_components(cache, ["hook_embed"], [layer.attention.dense for layer in self.layers],
                                self.config.num_attention_heads)

    def unembedding(self) -> tuple[Tensor, Tensor | None, RemovableLayerNorm | None]:
        return self.lm_head.weight, self.lm_head.bias, self.final_layer_norm

    def output_projections(self) -> list[tuple[nn.Linear, nn.Linear]]:
        """Per block, (attention output projection, MLP output projection): the first reads z (B, T, H·dh), the
        second the neuron activations (TransformerLens' `mlp.hook_post`). Where `lnfree compare` hooks to patch
        heads and read neurons."""
        return [(layer.attention.dense, layer.mlp.dense_4h_to_h) for layer in self.layers]

    def architecture_rows(self) -> list[tuple[str, object]]:
        c = self.config
        return [("family", "GPT-NeoX"), ("layers", c.num_hidden_layers), ("d_model", c.hidden_size),
                ("heads", c.num_attention_heads), ("d_mlp", c.intermediate_size), ("rotary dims", c.rotary_dim),
                ("parallel residual", c.use_parallel_residual), ("vocab", c.vocab_size),
                ("context", c.max_position_embeddings)]

    def norm_reads(self, twin: NeoX) -> list[NormRead]:
        """query_key_value packs q|k|v per head: the Q/K path reads each head's first 2·dh rows, the V path its
        last dh; post_attention_layernorm reads dense_h_to_4h; the final norm the head."""
        H, dh = self.config.num_attention_heads, self.config.head_dim
        rows = torch.arange(3 * H * dh).view(H, 3, dh)
        qk, v = rows[:, :2].flatten(), rows[:, 2:].flatten()
        reads = []
        for src, dst in zip(self.layers, twin.layers, strict=True):
            ln, qkv, into = src.input_layernorm, src.attention.query_key_value, dst.attention.query_key_value
            reads += [NormRead.of(ln, qkv, into, 0, qk), NormRead.of(ln, qkv, into, 1, v),
                      NormRead.of(src.post_attention_layernorm, src.mlp.dense_h_to_4h, dst.mlp.dense_h_to_4h)]
        return reads + [NormRead.of(self.final_layer_norm, self.lm_head, twin.lm_head)]


# ---- transformers checkpoint mapping --------------------------------------------------------------------------
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OWN = ("normalization",)


def config_from_hf(hf: dict) -> NeoXConfig:
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:  # never fall back to defaults for a config that is not what it says
        raise ValueError(f"config.json names GPT-NeoX but lacks {', '.join(missing)}")
    if hf.get("hidden_act", "gelu") not in _ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; supported: {', '.join(_ACTIVATIONS)}")
    if hf["hidden_size"] % hf["num_attention_heads"]:
        raise ValueError(f"hidden_size={hf['hidden_size']} is not divisible by num_attention_heads="
                         f"{hf['num_attention_heads']}")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rotary_emb_base", 10000.0),
                                         "partial_rotary_factor": hf.get("rotary_pct", 1.0)}
    names = {f.name for f in fields(NeoXConfig)} - {"rope_parameters", *_OWN}
    return NeoXConfig(**{k: v for k, v in hf.items() if k in names}, rope_parameters=rope,
                      normalization=hf.get("normalization", hf.get("model_type") != NOLN_MODEL_TYPE))


def config_to_hf(cfg: NeoXConfig) -> dict:
    hf = {k: v for k, v in asdict(cfg).items() if k not in _OWN}
    hf.update(attention_dropout=0.0, hidden_dropout=0.0)
    if cfg.normalization:
        hf.update(architectures=[ARCHITECTURE], model_type="gpt_neox")
    else:
        hf.update(architectures=[NOLN_ARCHITECTURE], model_type=NOLN_MODEL_TYPE, normalization=False)
    return hf


def _hf_config_object(cfg: NeoXConfig):
    from transformers import AutoConfig

    hf = {k: v for k, v in config_to_hf(replace(cfg, normalization=True)).items()
          if k not in ("model_type", "architectures")}
    return AutoConfig.for_model("gpt_neox", **hf)


def from_hf(hf_config: dict, state: dict[str, Tensor]) -> NeoX:
    cfg = config_from_hf(hf_config)
    model = NeoX(cfg)
    loaded = {}
    for key, tensor in state.items():
        k = key.removeprefix("gpt_neox.").replace("embed_out.", "lm_head.")  # older checkpoints call it embed_out
        if k.endswith(("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")):
            continue  # causal-mask and rotary buffers of old checkpoints
        loaded[k] = tensor
    load_checked(model, loaded, f"GPT-NeoX ({cfg.num_hidden_layers} layers)", cfg.layer_norm_eps)
    return model


def to_hf(model: NeoX) -> tuple[dict, dict[str, Tensor]]:
    return config_to_hf(model.config), hf_state(model, "gpt_neox.")


NEOX_FAMILY = Family(
    name="gpt_neox", architectures=(ARCHITECTURE, NOLN_ARCHITECTURE), model_types=("gpt_neox", NOLN_MODEL_TYPE),
    from_hf=from_hf, to_hf=to_hf, build=lambda hf: NeoX(config_from_hf(hf)),
    config_dict=lambda m: config_to_hf(m.config), hf_module="lnfree.models.neox_hf",
    new_model=lambda vocab, ctx, d, n_layers, n_heads, eos, seed: init_normal(NeoX(NeoXConfig(
        vocab_size=vocab, max_position_embeddings=ctx, hidden_size=d, intermediate_size=4 * d,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, bos_token_id=eos, eos_token_id=eos)), seed))
