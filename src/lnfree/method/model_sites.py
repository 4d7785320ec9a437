"""The method's operations over every norm site of a model: switching statistics on for training forwards,
gathering the uniformity loss, setting the σ̂ rule, the per-step EMA and reading a published LN-free checkpoint
(the fold checks live with the fold, in fold.py). A model only lists its norms (`LNModel.norm_layers`); what is
done to them lives here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import Tensor

from .fold import PUBLISHED_NOLN_MIN_EPS
from .sigma import SigmaRule
from .sites import reduce_across_ranks

if TYPE_CHECKING:
    from ..models.base import LNModel


@contextlib.contextmanager
def collect_norm_stats(model: LNModel) -> Iterator[None]:
    """Record per-token std at tracked sites for the forwards run inside this block (training forwards only).
    Backward runs outside the block, so activation-checkpoint recomputes are not counted."""
    layers = model.norm_layers()
    for layer in layers:
        layer.collecting = True
    try:
        yield
    finally:
        for layer in layers:
            layer.collecting = False


@contextlib.contextmanager
def uniformity_terms(model: LNModel, kind: str = "sites") -> Iterator[list[Tensor]]:
    """The "sites" / "sites-worst" auxiliary loss (aux.py): every norm's log-uniformity term of the forwards run
    inside this block, in one list (with their gradients)."""
    if model.gradient_checkpointing:
        raise ValueError(f"--aux-kind {kind} cannot be combined with --activation-checkpointing (a recomputed "
                         "block would measure its norms twice); use --aux-kind relative, or no checkpointing")
    terms: list[Tensor] = []
    layers = model.norm_layers()
    for layer in layers:
        layer.uniformity, layer.uniformity_worst = terms, kind == "sites-worst"
    try:
        yield terms
    finally:
        for layer in layers:
            layer.uniformity = None


def set_sigma_rule(model: LNModel, rule: SigmaRule, micro_batches_per_step: int | None = None) -> None:
    """How σ̂ is measured and followed (sigma.py). With `micro_batches_per_step`, a "call" rule moves σ̂ inside
    every training forward; without, statistics wait for `ema_step` (calibration)."""
    for layer in model.norm_layers():
        layer.rule = rule
        per_call = rule.ema == "call" and rule.collects and micro_batches_per_step
        layer.call_momentum = rule.call_momentum(micro_batches_per_step, rule.reads(layer.roles)) if per_call else None


def set_static_graph(model: LNModel, static: bool = True) -> None:
    """Compute every site's divisor on the device whatever its state (`RemovableLayerNorm._forward_static`), so
    that one compiled graph serves the whole removal: a site switch neither breaks nor recompiles it. The training
    loop turns this on with `--compile`; eager runs keep the cheaper branch per state."""
    for layer in model.norm_layers():
        layer.static = static


def ema_step(model: LNModel, momentum: float) -> None:
    """Fold the collected std into σ̂ at every tracked site (once per optimizer step, "step" rule), the statistics
    of every rank summed in one collective."""
    layers = model.norm_layers()
    reduce_across_ranks([site for layer in layers for site in layer.tracked_sites()])
    for layer in layers:
        layer.ema_step(momentum, reduce=False)


def adopt_published_convention(model: LNModel, eps: float) -> bool:
    """Read a checkpoint in the published LN-free convention as what it means. The published LN-free models
    (apollo-research/gpt2_noLN, schaeff/gpt2-*_LNFree*) — and our hf-compat exports — keep their norm modules with
    eps ≥ 1e6 (1e12) and gains scaled by sqrt(eps): sqrt(var + eps) ≈ sqrt(eps) makes every norm a fixed division.
    Every site is then frozen at σ̂ = sqrt(eps) without specials, so the fold gives the exact norm-free model; the
    stored function differs by a relative var/(2·eps) (< 1e-6 for residual std below 1e3). Returns whether it
    applied."""
    if eps < PUBLISHED_NOLN_MIN_EPS:
        return False
    for site in model.norm_sites().values():
        site.set_state(True, 0.0, 0.0)
        site.sigma.fill_(math.sqrt(eps))
    return True
