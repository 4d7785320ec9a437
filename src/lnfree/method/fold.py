"""Folding a frozen LayerNorm into the linear map that reads it.

A frozen site computes LN(x) = (x − mean(x)) / σ̂ · γ + β, which is affine in x. For a row vector x of width D
and the centring matrix C = I − 11ᵀ/D, a linear layer y = LN(x) Wᵀ + b reading it equals

    y = x · C diag(γ/σ̂) Wᵀ + (β Wᵀ + b)

so the LN disappears into new weights W' = (W diag(γ/σ̂)) C and bias b' = b + W β. Right-multiplying by C
subtracts, from every row of W diag(γ/σ̂), its mean over the input dimension. A frozen RMSNorm, x / σ̂ · γ, is the
same without C and β. Done in float64, then cast back.

One fold serves every family (`fold_model`): a family declares, as `NormRead`s, which linear map reads which path
of which norm (and, for per-head q/k norms, which projection's rows a head's gain scales); everything else of the
norm-free twin is the model's own parameters under the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..models.base import LNModel
    from .sites import RemovableLayerNorm


@torch.no_grad()
def fold_layernorm_into_linear(
    gamma: Tensor, beta: Tensor | None, sigma: Tensor | float, weight: Tensor, bias: Tensor | None,
    centre: bool = True,
) -> tuple[Tensor, Tensor]:
    """weight: (out, in) as in nn.Linear; returns (W', b') with b' always present, in weight's dtype.
    `centre=False` folds a frozen RMSNorm, x / σ̂ · γ (no C, no β)."""
    w64 = weight.double() * (gamma.double() / float(sigma))  # (out, in)
    if centre:
        w64 = w64 - w64.mean(dim=1, keepdim=True)  # · C
    b64 = weight.double() @ beta.double() if beta is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    if bias is not None:
        b64 = b64 + bias.double()
    return w64.to(weight.dtype), b64.to(weight.dtype)


@dataclass(frozen=True)
class NormRead:
    """A linear map reading path `site` of `norm`: its weight (out, in) and bias — `rows` of them, when one packed
    projection serves several paths — fold into the same rows of `into`, a module of the norm-free twin. With
    `per_head`, `norm` is instead a per-head norm applied to this map's output (Qwen3's q/k norms): its γ/σ̂_h
    scales each head's rows of `into` (after the input side is folded)."""

    norm: RemovableLayerNorm
    weight: Tensor
    bias: Tensor | None
    into: nn.Linear
    site: int = 0
    rows: slice | Tensor | None = None
    per_head: bool = False

    @classmethod
    def of(cls, norm: RemovableLayerNorm, linear: nn.Linear, into: nn.Linear, site: int = 0,
           rows: slice | Tensor | None = None) -> NormRead:
        return cls(norm, linear.weight, linear.bias, into, site, rows)


def normalising_sites(model: LNModel) -> list[str]:
    """Sites whose divisor still depends on the token (`NormSite.normalises`); empty once foldable."""
    return [name for name, site in model.norm_sites().items() if site.normalises]


def check_foldable(model: LNModel) -> None:
    """Raise a one-line error naming the sites that still normalise per token or keep a special σ̂."""
    sites = model.norm_sites()
    live = [n for n in normalising_sites(model) if not sites[n].is_frozen]
    special = [n for n in normalising_sites(model) if sites[n].is_frozen]
    if live:
        raise ValueError(f"cannot fold: {len(live)} of {len(sites)} site(s) still live "
                         f"({', '.join(live[:3])}{', …' if len(live) > 3 else ''}); finish the removal schedule first")
    if special:
        raise ValueError(f"cannot fold: {len(special)} site(s) still use a position-0/EOT special σ̂ "
                         f"({', '.join(special[:3])}{', …' if len(special) > 3 else ''}); run the schedule past its "
                         "special-σ̂ removal")


@torch.no_grad()
def fold_model(model: LNModel) -> LNModel:
    """The norm-free twin of a fully frozen model (no live site, no special σ̂), computing the same function: every
    parameter the twin shares by name and shape is copied, every `model.norm_reads(twin)` entry folded."""
    check_foldable(model)
    ref = next(model.parameters())
    twin = type(model)(replace(model.config, normalization=False)).to(dtype=ref.dtype, device=ref.device)
    theirs = twin.state_dict()
    shared = {k: v for k, v in model.state_dict().items() if k in theirs and theirs[k].shape == v.shape}
    twin.load_state_dict(shared, strict=False)
    reads = model.norm_reads(twin)
    for read in sorted(reads, key=lambda r: r.per_head):  # input sides first, then per-head output gains
        _fold_read(read)
    names = {id(m): n for n, m in twin.named_modules()}
    written = {f"{names[id(r.into)]}.{p}" for r in reads for p in ("weight", "bias")}
    unset = sorted(k for k in theirs if k not in shared and k not in written)
    if unset:  # a family that declared too little would otherwise ship freshly initialised weights
        raise RuntimeError(f"{type(model).__name__}.norm_reads leaves the norm-free twin's {', '.join(unset[:3])} "
                           "unset")
    return twin


def _fold_read(read: NormRead) -> None:
    norm, rows = read.norm, slice(None) if read.rows is None else read.rows
    into = read.into
    if read.per_head:  # γ (dh,) / σ̂ (H,): one gain per output row of head h
        scale = (norm.weight[None, :] / norm.sites[read.site].sigma[:, None]).reshape(-1, 1)  # (H·dh, 1)
        into.weight.copy_(into.weight * scale)
        if into.bias is not None:
            into.bias.copy_(into.bias * scale[:, 0])
        return
    beta = None if norm.rms else norm.bias
    bias = None if read.bias is None else read.bias[rows]
    w, b = fold_layernorm_into_linear(norm.weight, beta, norm.sites[read.site].sigma, read.weight[rows], bias,
                                      centre=not norm.rms)
    into.weight[rows] = w
    if into.bias is not None:
        into.bias[rows] = b
    elif beta is not None or bias is not None:
        raise RuntimeError("a folded LayerNorm's β (or the map's own bias) needs a bias in the norm-free twin")


# The published LN-free checkpoints' convention (apollo-research/gpt2_noLN, schaeff/gpt2-*_LNFree*): every norm
# keeps its module with eps = 1e12 and gain sqrt(eps) = 1e6, so that it only centres (see export/compat.py).
COMPAT_EPS = 1e12
# Families with no published convention (Pythia, Llama, Qwen) use a larger eps: the convention's relative error is
# var/(2·eps) per norm, and real models' massive activations reach a residual std of 1e3–1e4 (SmolLM2-135M), where
# 1e12 leaves logit errors near 1e-4. Every value ≥ PUBLISHED_NOLN_MIN_EPS reads back the same way; 1e16 keeps the
# gains sqrt(eps)·γ/σ̂ and var + eps far inside fp32's and bf16's range.
WIDE_COMPAT_EPS = 1e16
PUBLISHED_NOLN_MIN_EPS = 1e6  # a checkpoint whose norms' eps is at least this is read in that convention
# Largest relative reconstruction residual of a tied head that we still call exact (fp32 rounding of the fold
# itself is ~1e-7 relative).
TIE_RTOL = 1e-5


class HeadNotTiedError(ValueError):
    """The folded lm_head is not wte · diag(g) · C (+ wte · β): a tied GPT-2 cannot express it."""


@torch.no_grad()
def untie_head(wte: Tensor, w_u: Tensor, b_u: Tensor) -> tuple[Tensor, Tensor, float]:
    """Recover the final norm's folded gain g (D,) and bias β (D,) from wte (V, D), W_U' (V, D), b_U (V,).

    Solves min_g ||wte diag(g) C − W_U'||_F (normal equations A g = r with A = diag(‖w_j‖²) − wteᵀwte / D,
    r_j = w_jᵀ W_U'[:, j]) and β = argmin ||wte β − b_U||, all in float64. Returns (g, β, relative residual).
    """
    E, W, b = wte.double(), w_u.double(), b_u.double()  # (V, D), (V, D), (V,)
    D = E.shape[1]
    gram = E.T @ E  # (D, D)
    A = torch.diag(torch.diagonal(gram)) - gram / D
    r = (E * W).sum(0)  # (D,)
    g = torch.linalg.solve(A, r)
    beta = torch.linalg.lstsq(E, b.unsqueeze(1)).solution.squeeze(1)  # (D,)
    M = E * g
    rebuilt = M - M.mean(dim=1, keepdim=True)  # wte diag(g) C
    scale = W.abs().max().clamp_min(1e-30)
    residual = max((rebuilt - W).abs().max().item() / scale.item(),
                   (E @ beta - b).abs().max().item() / b.abs().max().clamp_min(scale).item())
    return g, beta, residual
