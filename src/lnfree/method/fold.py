"""Folding a frozen LayerNorm into the linear map that reads it.

A frozen site computes LN(x) = (x − mean(x)) / σ̂ · γ + β, which is affine in x. For a row vector x of width D
and the centring matrix C = I − 11ᵀ/D, a linear layer y = LN(x) Wᵀ + b reading it equals

    y = x · C diag(γ/σ̂) Wᵀ + (β Wᵀ + b)

so the LN disappears into new weights W' = (W diag(γ/σ̂)) C and bias b' = b + W β. Right-multiplying by C
subtracts, from every row of W diag(γ/σ̂), its mean over the input dimension. Done in float64, then cast back.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def fold_layernorm_into_linear(
    gamma: Tensor, beta: Tensor, sigma: Tensor | float, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """weight: (out, in) as in nn.Linear; returns (W', b') with b' always present, in weight's dtype."""
    w64 = weight.double() * (gamma.double() / float(sigma))  # (out, in)
    w64 = w64 - w64.mean(dim=1, keepdim=True)  # · C
    b64 = weight.double() @ beta.double()  # (out,)
    if bias is not None:
        b64 = b64 + bias.double()
    return w64.to(weight.dtype), b64.to(weight.dtype)
