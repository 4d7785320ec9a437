"""σ̂ measurement and schedule application: the only places the method writes into norm sites."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor

from .. import distributed
from ..models.base import LNModel
from .model_sites import collect_norm_stats, ema_step, set_sigma_rule
from .schedule import SiteState
from .sigma import SigmaRule


@torch.no_grad()
def calibrate(model: LNModel, batches: Iterable[Tensor], rule: SigmaRule | None = None) -> dict[str, float]:
    """Set every live site's σ̂ (and its position-0 / EOT specials) to `rule`'s statistic of its input: by
    default the mean per-token std, position 0 and EOT positions apart.

    Runs plain forwards in eval mode over `batches` (token ids, (B, T)), shared among the ranks of a distributed
    run; returns {site: σ̂}. The rule stays set
    on the model; a training run then switches on its EMA (`model_sites.set_sigma_rule`).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch of tokens")
    set_sigma_rule(model, rule or SigmaRule())  # no micro-batch count: statistics wait for the ema_step below
    was_training = model.training
    model.eval()
    # In a distributed run rank r measures batches r, r + W, …; a rank left without one in the last round runs
    # an unmeasured forward, since a sharded model's forwards are collective. The sums meet in ema_step.
    world = distributed.current()
    rank, size = world.rank, world.size
    for first in range(0, len(batches), size):
        mine = first + rank
        with collect_norm_stats(model) if mine < len(batches) else contextlib.nullcontext():
            model(batches[mine if mine < len(batches) else 0])
    ema_step(model, momentum=0.0)  # momentum 0: σ̂ := the measured statistic
    model.train(was_training)
    return {name: site.sigma.tolist() for name, site in model.norm_sites().items()}  # per head: a list


@torch.no_grad()
def apply_site_states(model: LNModel, states: dict[str, SiteState]) -> list[str]:
    """Put each named site in its scheduled state; returns the names that froze just now.

    A site's σ̂ stops following the EMA the moment it freezes (`RemovableLayerNorm.tracked_sites`; the
    "until-fixed" rule keeps it following while a special is weighted in). Called at
    every step boundary; reads nothing from the device and writes only the sites whose state changes.
    """
    sites = model.norm_sites()
    unknown = sorted(set(states) - set(sites))
    if unknown:
        raise ValueError(f"schedule names site(s) this model lacks: {', '.join(unknown[:4])}; "
                         f"the model has {len(sites)} sites, e.g. {next(iter(sites), '-')}")
    newly_frozen = []
    for name, state in states.items():
        site = sites[name]
        if state.frozen and not site.is_frozen:
            newly_frozen.append(name)
        site.set_state(state.frozen, state.bos_weight, state.eot_weight)
    return newly_frozen
