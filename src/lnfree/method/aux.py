"""Auxiliary losses that keep the per-token residual std uniform, so that dividing by one fixed σ̂ costs little.

σ_t is a token's std (RMSNorm: RMS) at a norm's input, σ̄ its mean over the regular positions of the batch (not
position 0, not EOT positions), held fixed (no gradient through σ̄). Four forms (`TrainConfig.aux_kind`):
  * "baroni"   — Baroni et al. 2025: mean over every token of (σ_t − σ̄)² at the ln_final input. Its value grows
    with the square of the residual scale, so a weight chosen for GPT-2 means something else on another model
    (SmolLM2-135M: 298 at step 0, against CE 2).
  * "relative" — the same divided by σ̄²: mean of (σ_t/σ̄ − 1)², scale-free; equal to "baroni" / σ̄².
  * "sites"    — ours: mean of log²(σ_t/σ̄) (σ̄ here the geometric mean) at the input of every norm (each input
    once, whatever its paths), averaged over the norms. Scale-free and bounded for outliers (a 170× position-0
    std costs log² 170 ≈ 26 per token, not 170²), and it reaches the early blocks, where a real model's per-token
    std varies most.
  * "sites-worst" — ours: "sites" plus, per norm, the mean over sequences of the largest log²(σ_t/σ̄) — the most
    outlying token of each sequence weighs as much as all the others together. In "sites" one massive token
    (position 0) is 1 of T terms: on SmolLM2-135M after 250 steps of lnfree-uniform its std was still 6–10× the
    median's in blocks 3–20, and the specials that hid it could not be removed.
"""

from __future__ import annotations

import torch
from torch import Tensor

AUX_KINDS = ("baroni", "relative", "sites", "sites-worst")
PER_NORM_KINDS = ("sites", "sites-worst")  # the forms read at every norm's input (`model_sites.uniformity_terms`)


def regular_positions(std: Tensor, eot_mask: Tensor | None) -> Tensor:
    """(B, T, 1 …) weights of the positions σ̄ is measured on: not position 0, not EOT; as `std`'s dtype, a mask that
    needs no data-dependent shape and reads nothing back."""
    regular = torch.ones(std.shape[:2], dtype=torch.bool, device=std.device)
    regular[:, 0] = False
    if eot_mask is not None:
        regular &= ~eot_mask
    return regular.view(*std.shape[:2], *([1] * (std.dim() - 2))).to(std.dtype)


def _sigma_bar(std: Tensor, eot_mask: Tensor | None) -> Tensor:
    weights = regular_positions(std, eot_mask)
    return (std.detach() * weights).sum((0, 1)) / weights.sum((0, 1)).clamp(min=1)  # () or (H,) per head


def aux_std_loss(final_std: Tensor, eot_mask: Tensor | None, kind: str = "baroni") -> Tensor:
    """The ln_final-input forms: "baroni" (absolute) or "relative" (over σ̄²)."""
    sigma_bar = _sigma_bar(final_std, eot_mask)
    loss = (final_std - sigma_bar).pow(2).mean()
    return loss / sigma_bar.pow(2) if kind == "relative" else loss


def log_uniformity(std: Tensor, eot_mask: Tensor | None, worst: bool = False) -> Tensor:
    """One norm's term of the "sites" form: mean over tokens (and heads) of log²(σ_t / σ̄), σ̄ the geometric mean
    over regular positions (a handful of exploding tokens must not move the reference every other token is held
    to); with `worst` ("sites-worst"), plus the mean over sequences of each sequence's largest term."""
    log_std = std.float().log()
    weights = regular_positions(log_std, eot_mask)
    log_bar = (log_std.detach() * weights).sum((0, 1)) / weights.sum((0, 1)).clamp(min=1)
    square = (log_std - log_bar).pow(2)  # (B, T) or (B, T, H)
    return square.mean() + square.amax(dim=1).mean() if worst else square.mean()
