"""Folding a frozen LayerNorm into the linear map that reads it.

A frozen site computes LN(x) = (x − mean(x)) / σ̂ · γ + β, which is affine in x. For a row vector x of width D
and the centring matrix C = I − 11ᵀ/D, a linear layer y = LN(x) Wᵀ + b reading it equals

    y = x · C diag(γ/σ̂) Wᵀ + (β Wᵀ + b)

so the LN disappears into new weights W' = (W diag(γ/σ̂)) C and bias b' = b + W β. Right-multiplying by C
subtracts, from every row of W diag(γ/σ̂), its mean over the input dimension. A frozen RMSNorm, x / σ̂ · γ, is the
same without C and β. Done in float64, then cast back.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
