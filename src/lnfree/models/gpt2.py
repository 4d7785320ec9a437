"""GPT-2 family: a compact pre-LN GPT-2 whose LayerNorms are removable, and its `transformers` mapping.

Reads any `GPT2LMHeadModel` checkpoint (all sizes) and writes it back; a folded model (no normalization,
untied lm_head with bias) is written with `architectures: ["LNFreeGPT2LMHeadModel"]`, model_type
`lnfree_gpt2`. Layout differences from `transformers`: we use nn.Linear (weight (out, in)) where GPT-2 uses
Conv1D (weight (in, out)), so every projection is transposed on the way in and out.

Activation cache names follow TransformerLens: hook_embed, hook_pos_embed, blocks.{i}.hook_resid_pre,
blocks.{i}.attn.hook_z, blocks.{i}.hook_attn_out, blocks.{i}.hook_resid_mid, blocks.{i}.hook_mlp_out,
blocks.{i}.hook_resid_post, ln_final.hook_normalized.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..method.fold import NormRead
from ..method.sites import RemovableLayerNorm
from .base import Family, LNModel
from .common import causal_attention, linear_weights, load_checked, pre_norm_block, stack_components

_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 · n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    normalization: bool = True  # False: folded, norm-free, lm_head untied with bias

    @property
    def d_mlp(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head, self.d = cfg.n_head, cfg.n_embd
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # rows: Q | K | V
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout_p = 0.0  # on the attention weights in training, as transformers' attn_pdrop

    def forward(self, x_qk: Tensor, x_v: Tensor, cache: dict | None = None, prefix: str = "") -> Tensor:
        """x_qk, x_v: (B, T, D) → z: (B, T, H, dh), the per-head mix of values before c_proj."""
        B, T, D = x_qk.shape
        if x_qk is x_v:  # one input: one matmul
            q, k, v = self.c_attn(x_qk).split(D, dim=-1)
        else:  # Q/K and V read different norm outputs: slice the packed weights, no duplicate work
            # (split, not slicing: its backward writes both parts of the gradient at once, no zero-filled copies)
            weight, bias = linear_weights(self.c_attn)
            (w_qk, w_v), (b_qk, b_v) = weight.split([2 * D, D]), bias.split([2 * D, D])
            q, k = F.linear(x_qk, w_qk, b_qk).split(D, dim=-1)
            v = F.linear(x_v, w_v, b_v)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, dh)
        return causal_attention(q, k, v, self.dropout_p if self.training else 0.0, cache, prefix)


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.d_mlp)
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.n_embd)
        self.act = _ACTIVATIONS[cfg.activation_function]
        self.dropout_p = 0.0  # on its output in training, as transformers' resid_pdrop

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) → (B, T, D)
        return F.dropout(self.c_proj(self.act(self.c_fc(x))), self.dropout_p, self.training)


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, i: int):
        super().__init__()
        self.i = i
        eps, d = cfg.layer_norm_epsilon, cfg.n_embd
        self.ln_1 = RemovableLayerNorm(d, eps, ("ln1qk", "ln1v"), i) if cfg.normalization else None
        self.attn = Attention(cfg)
        self.ln_2 = RemovableLayerNorm(d, eps, ("ln2",), i) if cfg.normalization else None
        self.mlp = MLP(cfg)
        self.dropout_p = 0.0  # on the attention output in training, as transformers' resid_pdrop

    def forward(self, x: Tensor, eot_mask: Tensor | None, cache: dict | None) -> Tensor:  # (B, T, D)
        prefix = f"blocks.{self.i}."
        return pre_norm_block(x, eot_mask, cache, prefix, self.ln_1, lambda a, b: self.attn(a, b, cache, prefix),
                              self.attn.c_proj, self.ln_2, self.mlp, self.dropout_p if self.training else 0.0)


class GPT2(LNModel):
    family = "gpt2"

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        if cfg.normalization:
            self.ln_f = RemovableLayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, ("ln_final",))
            self.lm_head = None  # tied to wte, as in GPT-2
        else:
            self.ln_f = None
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=True)
        self.dropout_p = 0.0  # on the summed embeddings in training, as transformers' embd_pdrop

    @property
    def n_layers(self) -> int:
        return self.config.n_layer

    @property
    def context_length(self) -> int:
        return self.config.n_positions

    def forward(self, idx: Tensor, *, cache: dict | None = None, return_final_std: bool = False):
        """idx: (B, T) token ids → logits (B, T, V); with return_final_std also the ln_final input std (B, T)."""
        B, T = idx.shape
        if T > self.config.n_positions:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.config.n_positions}")
        eot_mask = self.eot_mask(idx)
        embed, pos_embed = self.wte(idx), self.wpe(torch.arange(T, device=idx.device))  # (B, T, D), (T, D)
        x = F.dropout(embed + pos_embed, self.dropout_p, self.training)
        if cache is not None:
            cache.update({"hook_embed": embed, "hook_pos_embed": pos_embed.expand(B, T, -1)})
        for block in self.h:
            x = self.run_block(block, x, eot_mask, cache=cache)
        if self.ln_f is not None:
            final = self.ln_f(x, eot_mask)[0]
            logits = F.linear(final, self.wte.weight)  # (B, T, V)
        else:
            final = x
            logits = self.lm_head(final)
        if cache is not None:
            cache["ln_final.hook_normalized"] = final
        if return_final_std:
            std = self.ln_f.input_std(x) if self.ln_f is not None else x.std(-1, correction=0)
            return logits, std
        return logits

    def residual_components(self, cache: dict[str, Tensor]) -> tuple[list[str], Tensor]:
        """Everything written to the final residual stream, (N, B, T, D), from a `forward(cache=…)`: both
        embeddings, each head (z · W_O), each MLP, and the attention output biases summed."""
        return stack_components(cache, ["hook_embed", "hook_pos_embed"], [b.attn.c_proj for b in self.h],
                                self.config.n_head)

    def unembedding(self) -> tuple[Tensor, Tensor | None, RemovableLayerNorm | None]:
        """(W_U (V, D), b_U (V,) or None, the final norm or None): logits = W_U · final_norm(x) + b_U."""
        if self.ln_f is None:
            return self.lm_head.weight, self.lm_head.bias, None
        return self.wte.weight, None, self.ln_f

    def output_projections(self) -> list[tuple[nn.Linear, nn.Linear]]:
        """Per block, (attention output projection, MLP output projection): the first reads z (B, T, H·dh), the
        second the neuron activations (TransformerLens' `mlp.hook_post`). Where `lnfree compare` hooks to patch
        heads and read neurons."""
        return [(b.attn.c_proj, b.mlp.c_proj) for b in self.h]

    def architecture_rows(self) -> list[tuple[str, object]]:
        cfg = self.config
        return [("family", "GPT-2"), ("layers", cfg.n_layer), ("d_model", cfg.n_embd), ("heads", cfg.n_head),
                ("d_mlp", cfg.d_mlp), ("vocab", cfg.vocab_size), ("context", cfg.n_positions),
                ("activation", cfg.activation_function)]

    @torch.no_grad()
    def plant_position0_writer(self, scale: float, n_neurons: int = 8, seed: int = 1) -> None:
        """Give the analog GPT-2's position-0 structure at initialisation, so that removal gets GPT-2-hard.

        GPT-2's position 0 carries a residual outlier written by an early MLP. Here: the position-0 embedding gets
        a marker direction u (3 units), and `n_neurons` neurons of block 0's MLP read u (threshold 5, so only
        position 0 fires) and write `scale` along another direction v. Measured (6L×128, 500 steps): pretraining
        keeps the embedding marker (position-0 std 3.2× the rest at the embedding) but reshapes the MLP writer away
        (1.2× after block 0); freezing every LN at once then costs +45 nats instead of +0.27, and 5% fine-tuning
        leaves LN-free − vanilla at +0.24 nats with baroni2025 — a much harder analog.
        """
        d = self.config.n_embd
        g = torch.Generator().manual_seed(seed)
        u, v = torch.randn(d, generator=g), torch.randn(d, generator=g)
        u, v = u / u.norm(), v / v.norm()
        self.wpe.weight[0] += 3 * u
        mlp = self.h[0].mlp
        mlp.c_fc.weight[:n_neurons] = u
        mlp.c_fc.bias[:n_neurons] = -5.0
        mlp.c_proj.weight[:, :n_neurons] = (scale / n_neurons) * v[:, None]

    def norm_reads(self, twin: GPT2) -> list[NormRead]:
        """ln_1's Q/K path reads the first 2·D rows of c_attn, its V path the last D; ln_2 reads c_fc; ln_f the
        tied unembedding, folded into the twin's own head (with a bias, where ln_f's β lands)."""
        D = self.config.n_embd
        reads = []
        for src, dst in zip(self.h, twin.h, strict=True):
            qkv, into = src.attn.c_attn, dst.attn.c_attn
            reads += [NormRead.of(src.ln_1, qkv, into, 0, slice(0, 2 * D)),
                      NormRead.of(src.ln_1, qkv, into, 1, slice(2 * D, 3 * D)),
                      NormRead.of(src.ln_2, src.mlp.c_fc, dst.mlp.c_fc)]
        return reads + [NormRead(self.ln_f, self.wte.weight, None, twin.lm_head)]


# ---- transformers checkpoint mapping --------------------------------------------------------------------------
# Conv1D weights that are stored (in, out) in transformers and (out, in) here.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_UNSUPPORTED_FLAGS = {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True,
                      "scale_attn_weights": False, "add_cross_attention": True}
NOLN_ARCHITECTURE, NOLN_MODEL_TYPE = "LNFreeGPT2LMHeadModel", "lnfree_gpt2"


def config_from_hf(hf: dict) -> GPT2Config:
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in hf]
    if missing:
        raise ValueError(f"config.json names a GPT-2 architecture but lacks {', '.join(missing)}")
    for key, bad in _UNSUPPORTED_FLAGS.items():
        if hf.get(key) == bad:
            raise ValueError(f"unsupported GPT-2 variant: config has {key}={bad}; lnfree supports standard GPT-2")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation_function {act!r}; supported: {', '.join(_ACTIVATIONS)}")
    names = {f.name for f in fields(GPT2Config)}
    cfg = GPT2Config(**{k: v for k, v in hf.items() if k in names})
    cfg.normalization = hf.get("normalization", hf.get("model_type") != NOLN_MODEL_TYPE)
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
    return cfg


def config_to_hf(cfg: GPT2Config) -> dict:
    hf = {k: v for k, v in asdict(cfg).items() if k != "normalization"}
    hf.update(n_ctx=cfg.n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if cfg.normalization:
        hf.update(architectures=["GPT2LMHeadModel"], model_type="gpt2", tie_word_embeddings=True)
    else:
        hf.update(architectures=[NOLN_ARCHITECTURE], model_type=NOLN_MODEL_TYPE, tie_word_embeddings=False,
                  normalization=False)
    return hf


def _strip_prefix(key: str) -> str:
    return key[len("transformer."):] if key.startswith("transformer.") else key


def from_hf(hf_config: dict, state: dict[str, Tensor]) -> GPT2:
    cfg = config_from_hf(hf_config)
    model = GPT2(cfg)
    loaded = {}
    for key, tensor in state.items():
        k = _strip_prefix(key)
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints
        if k == "lm_head.weight" and cfg.normalization:
            wte = state.get("transformer.wte.weight", state.get("wte.weight"))
            if wte is not None and not torch.equal(tensor, wte):
                raise ValueError("this GPT-2 has an untied lm_head (tie_word_embeddings=false), which lnfree's "
                                 "GPT-2 with LayerNorm does not support; tie it or export it norm-free")
            continue  # the tied duplicate of wte
        loaded[k] = tensor.t() if k.endswith(_CONV1D) else tensor
    load_checked(model, loaded, f"GPT-2 ({cfg.n_layer} layers)", cfg.layer_norm_epsilon)
    return model


def to_hf(model: GPT2) -> tuple[dict, dict[str, Tensor]]:
    state = {}
    for k, tensor in model.state_dict().items():
        if ".sites." in k:
            continue  # σ̂ buffers have no place in a transformers checkpoint
        if k.endswith(_CONV1D):
            tensor = tensor.t()
        state[k if k.startswith("lm_head.") else "transformer." + k] = tensor.contiguous()
    return config_to_hf(model.config), state


GPT2_FAMILY = Family(name="gpt2", architectures=("GPT2LMHeadModel", NOLN_ARCHITECTURE),
                     model_types=("gpt2", NOLN_MODEL_TYPE), from_hf=from_hf, to_hf=to_hf,
                     build=lambda hf: GPT2(config_from_hf(hf)), config_dict=lambda m: config_to_hf(m.config),
                     hf_module="lnfree.models.gpt2_hf",
                     new_model=lambda vocab, ctx, d, n_layers, n_heads, eos, seed: init_weights(GPT2(GPT2Config(
                         vocab_size=vocab, n_positions=ctx, n_embd=d, n_layer=n_layers, n_head=n_heads,
                         bos_token_id=eos, eos_token_id=eos)), seed))


def init_weights(model: GPT2, seed: int = 0) -> GPT2:
    """GPT-2's initialisation (normal 0.02; residual projections scaled by 1/sqrt(2·n_layer)), for pretraining."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * model.config.n_layer) if name.endswith("c_proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
