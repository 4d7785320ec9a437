"""Llama-style family: Llama (1–3), Qwen2 and Qwen3 — RMSNorm, rotary positions, SwiGLU MLP, grouped-query
attention, optional Q/K/V biases (Qwen2), per-head q/k RMSNorms (Qwen3), tied or untied embeddings — with removable
norms, and its `transformers` mapping.

Module names follow transformers (`embed_tokens`, `layers.{i}.self_attn.q_proj`, `input_layernorm`, `norm`), so a
checkpoint maps by adding or stripping the `model.` prefix. Sites: `blocks.{i}.ln1.qk` / `.ln1.v` (input_layernorm as
read by Q/K and by V), `blocks.{i}.ln2` (post_attention_layernorm), `ln_final` (norm) — the standard layout — and,
for Qwen3, `blocks.{i}.attn.q_norm` / `.k_norm` (kind `qk_norm`), RMSNorms over each head's dimensions that freeze
with one σ̂ per head and fold into the rows of q_proj / k_proj (before the rotation, as they act).
A frozen RMSNorm site computes x / σ̂ · γ, so the folded model gains no biases: it is the stock architecture with
identity norms and an untied head (`architectures: ["LNFree<Arch>"]`, model_type `lnfree_<type>`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

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
    load_checked,
    pre_norm_block,
    rotary_decoder,
    rotate,
    stack_components,
)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    hidden_act: str = "silu"
    attention_bias: bool = False  # Q/K/V/O biases (Llama option)
    mlp_bias: bool = False
    qkv_bias: bool = False  # Q/K/V biases only (Qwen2)
    qk_norm: bool = False  # per-head RMSNorms of queries and keys (Qwen3)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    architecture: str = "LlamaForCausalLM"
    normalization: bool = True  # False: folded, norm-free, untied head

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, i: int):
        super().__init__()
        H, K, dh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.n_head, self.n_kv, self.d_head = H, K, dh
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(D, H * dh, bias=qkv_bias)
        self.k_proj = nn.Linear(D, K * dh, bias=qkv_bias)
        self.v_proj = nn.Linear(D, K * dh, bias=qkv_bias)
        self.o_proj = nn.Linear(H * dh, D, bias=cfg.attention_bias)
        per_head = cfg.qk_norm and cfg.normalization
        eps = cfg.rms_norm_eps
        self.q_norm = RemovableLayerNorm(dh, eps, ("q_norm",), i, rms=True, heads=H) if per_head else None
        self.k_norm = RemovableLayerNorm(dh, eps, ("k_norm",), i, rms=True, heads=K) if per_head else None
        self.dropout_p = 0.0  # on the attention weights in training, as transformers' attention_dropout

    def forward(self, x_qk: Tensor, x_v: Tensor, cos: Tensor, sin: Tensor, eot_mask: Tensor | None = None,
                cache: dict | None = None, prefix: str = "") -> Tensor:
        """x_qk, x_v: (B, T, D) → z: (B, T, H, dh), the per-head mix of values before o_proj."""
        B, T, _ = x_qk.shape
        q = self.q_proj(x_qk).view(B, T, self.n_head, self.d_head)  # (B, T, H, dh)
        k = self.k_proj(x_qk).view(B, T, self.n_kv, self.d_head)  # (B, T, K, dh)
        if self.q_norm is not None:  # Qwen3: each head's query and key normalised before the rotation
            q, k = self.q_norm(q, eot_mask)[0], self.k_norm(k, eot_mask)[0]
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, dh), (B, K, T, dh)
        v = self.v_proj(x_v).view(B, T, self.n_kv, self.d_head).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.n_kv != self.n_head:  # grouped-query attention: each K/V head serves n_head / n_kv query heads
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))
        return causal_attention(q, k, v, self.dropout_p if self.training else 0.0, cache, prefix)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        D, M = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(D, M, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(D, M, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(M, D, bias=cfg.mlp_bias)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) → (B, T, D)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, i: int):
        super().__init__()
        self.i = i
        eps, D = cfg.rms_norm_eps, cfg.hidden_size
        norm = cfg.normalization
        self.input_layernorm = (RemovableLayerNorm(D, eps, ("ln1qk", "ln1v"), i, rms=True)
                                if norm else None)
        self.self_attn = Attention(cfg, i)
        self.post_attention_layernorm = RemovableLayerNorm(D, eps, ("ln2",), i, rms=True) if norm else None
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], eot_mask: Tensor | None,
                cache: dict | None) -> Tensor:  # (B, T, D)
        prefix, attn = f"blocks.{self.i}.", self.self_attn
        return pre_norm_block(x, eot_mask, cache, prefix, self.input_layernorm,
                              lambda a, b: attn(a, b, *rope, eot_mask, cache, prefix), attn.o_proj,
                              self.post_attention_layernorm, self.mlp)


class Llama(LNModel):
    family = "llama"

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_parameters, lambda: _hf_config_object(cfg))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RemovableLayerNorm(cfg.hidden_size, cfg.rms_norm_eps, ("ln_final",), rms=True) \
            if cfg.normalization else None
        tied = cfg.tie_word_embeddings and cfg.normalization
        self.lm_head = None if tied else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def _head(self) -> Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx: Tensor, *, cache: dict | None = None, return_final_std: bool = False):
        """idx: (B, T) token ids → logits (B, T, V); with return_final_std also the final norm's input RMS (B, T)."""
        B, T = idx.shape
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.context_length}")
        eot_mask = self.eot_mask(idx)
        x = self.embed_tokens(idx)  # (B, T, D)
        if cache is not None:
            cache["hook_embed"] = x
        x, final = rotary_decoder(self, x, self.layers, self.rotary, self.norm, eot_mask, cache)
        logits = F.linear(final, self._head())  # (B, T, V)
        if return_final_std:
            std = self.norm.input_std(x) if self.norm is not None else x.pow(2).mean(-1).sqrt()
            return logits, std
        return logits

    def residual_components(self, cache: dict[str, Tensor]) -> tuple[list[str], Tensor]:
        """The embedding, each head (z · W_O), each MLP, and the o_proj biases (if any) summed."""
        return stack_components(cache, ["hook_embed"], [layer.self_attn.o_proj for layer in self.layers],
                                self.config.num_attention_heads)

    def unembedding(self) -> tuple[Tensor, Tensor | None, RemovableLayerNorm | None]:
        return self._head(), None, self.norm

    def output_projections(self) -> list[tuple[nn.Linear, nn.Linear]]:
        """Per block, (attention output projection, MLP output projection): the first reads z (B, T, H·dh), the
        second the neuron activations (TransformerLens' `mlp.hook_post`). Where `lnfree compare` hooks to patch
        heads and read neurons."""
        return [(layer.self_attn.o_proj, layer.mlp.down_proj) for layer in self.layers]

    def architecture_rows(self) -> list[tuple[str, object]]:
        c = self.config
        return [("family", c.architecture.removesuffix("ForCausalLM")), ("layers", c.num_hidden_layers),
                ("d_model", c.hidden_size), ("heads", c.num_attention_heads), ("kv_heads", c.num_key_value_heads),
                ("d_head", c.head_dim), ("d_mlp", c.intermediate_size), ("vocab", c.vocab_size),
                ("context", c.max_position_embeddings), ("tied embeddings", c.tie_word_embeddings)]

    def norm_reads(self, twin: Llama) -> list[NormRead]:
        """input_layernorm's Q/K path reads q_proj and k_proj, its V path v_proj; post_attention_layernorm reads
        gate_proj and up_proj; the final norm the head (the embedding, when tied). Qwen3's per-head q/k norms scale
        each head's rows of q_proj / k_proj."""
        reads = []
        for src, dst in zip(self.layers, twin.layers, strict=True):
            ln, a, b = src.input_layernorm, src.self_attn, dst.self_attn
            reads += [NormRead.of(ln, a.q_proj, b.q_proj), NormRead.of(ln, a.k_proj, b.k_proj),
                      NormRead.of(ln, a.v_proj, b.v_proj, 1)]
            reads += [NormRead.of(src.post_attention_layernorm, getattr(src.mlp, n), getattr(dst.mlp, n))
                      for n in ("gate_proj", "up_proj")]
            if a.q_norm is not None:
                reads += [NormRead(a.q_norm, b.q_proj.weight, None, b.q_proj, per_head=True),
                          NormRead(a.k_norm, b.k_proj.weight, None, b.k_proj, per_head=True)]
        return reads + [NormRead(self.norm, self._head(), None, twin.lm_head)]


def _hf_config_object(cfg: LlamaConfig):
    """transformers' own config object for this model (its rope initialisers read one)."""
    from transformers import AutoConfig

    hf = {k: v for k, v in config_to_hf(cfg).items() if k not in ("model_type", "architectures")}
    return AutoConfig.for_model(cfg.model_type, **hf)


# ---- transformers checkpoint mapping --------------------------------------------------------------------------
NOLN_PREFIX = "LNFree"


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def config_from_hf(hf: dict) -> LlamaConfig:
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:  # never fall back to transformers' 7B defaults for a config that is not what it says
        raise ValueError(f"config.json names a Llama-style architecture but lacks {', '.join(missing)}")
    arch = (hf.get("architectures") or [""])[0].removeprefix(NOLN_PREFIX)
    if arch not in ARCHITECTURES:
        arch = {v: k for k, v in ARCHITECTURES.items()}.get(str(hf.get("model_type", "")).removeprefix("lnfree_"),
                                                              "")
    if hf.get("use_sliding_window"):
        raise ValueError("unsupported Qwen2 variant: config has use_sliding_window=true; lnfree supports full "
                         "causal attention")
    if hf.get("hidden_act", "silu") not in _ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; supported: {', '.join(_ACTIVATIONS)}")
    names = {f.name for f in fields(LlamaConfig)} - {"architecture", "normalization", "qkv_bias", "qk_norm"}
    rope = hf.get("rope_parameters") or {"rope_type": (hf.get("rope_scaling") or {}).get("rope_type", "default"),
                                         "rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}
    cfg = LlamaConfig(**{k: v for k, v in hf.items() if k in names and k != "rope_parameters"},
                      rope_parameters=rope, architecture=arch, qkv_bias=arch == "Qwen2ForCausalLM",
                      qk_norm=arch == "Qwen3ForCausalLM",
                      normalization=hf.get("normalization", not str(hf.get("model_type", "")).startswith("lnfree_")))
    if cfg.hidden_size % cfg.num_attention_heads and hf.get("head_dim") is None:
        raise ValueError(f"hidden_size={cfg.hidden_size} is not divisible by num_attention_heads="
                         f"{cfg.num_attention_heads}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"num_attention_heads={cfg.num_attention_heads} is not a multiple of num_key_value_heads="
                         f"{cfg.num_key_value_heads}")
    return cfg


def config_to_hf(cfg: LlamaConfig) -> dict:
    hf = {k: v for k, v in asdict(cfg).items() if k not in ("architecture", "normalization", "qkv_bias", "qk_norm")}
    hf.update(attention_dropout=0.0)
    if cfg.normalization:
        hf.update(architectures=[cfg.architecture], model_type=cfg.model_type)
    else:
        hf.update(architectures=[NOLN_PREFIX + cfg.architecture], model_type=f"lnfree_{cfg.model_type}",
                  tie_word_embeddings=False, normalization=False)
    return hf


def from_hf(hf_config: dict, state: dict[str, Tensor]) -> Llama:
    cfg = config_from_hf(hf_config)
    model = Llama(cfg)
    loaded = {}
    for key, tensor in state.items():
        k = key.removeprefix("model.")
        if k.endswith("rotary_emb.inv_freq"):
            continue  # a buffer old checkpoints stored; recomputed here
        if k == "lm_head.weight" and model.lm_head is None:
            if not torch.equal(tensor, state.get("model.embed_tokens.weight", tensor)):
                raise ValueError("tie_word_embeddings is true but lm_head differs from embed_tokens; fix the config")
            continue
        loaded[k] = tensor
    load_checked(model, loaded, f"{cfg.architecture} ({cfg.num_hidden_layers} layers)", cfg.rms_norm_eps)
    return model


def to_hf(model: Llama) -> tuple[dict, dict[str, Tensor]]:
    return config_to_hf(model.config), hf_state(model, "model.")


LLAMA_FAMILY = Family(
    name="llama", architectures=(*ARCHITECTURES, *(NOLN_PREFIX + a for a in ARCHITECTURES)),
    model_types=(*ARCHITECTURES.values(), *(f"lnfree_{t}" for t in ARCHITECTURES.values())),
    from_hf=from_hf, to_hf=to_hf, build=lambda hf: Llama(config_from_hf(hf)),
    config_dict=lambda m: config_to_hf(m.config), hf_module="lnfree.models.llama_hf",
    new_model=lambda vocab, ctx, d, n_layers, n_heads, eos, seed: init_normal(Llama(LlamaConfig(
        vocab_size=vocab, max_position_embeddings=ctx, hidden_size=d, intermediate_size=8 * d // 3 // 8 * 8,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, tie_word_embeddings=True, bos_token_id=eos,
        eos_token_id=eos)), seed),
    even_head_dim=True)
