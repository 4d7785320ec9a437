"""Named removal presets, with the settings their papers published (see ../shared/docs/papers.md).

Each preset is a function of model depth: the removal shape (order, gaps) is per layer, so a preset lays out
over any number of blocks. `baroni2025` picks the paper's per-size variant by depth (12/24/36/48 layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .config import Recipe, TrainConfig
from .method.schedule import RemovalSpec, Schedule, build_schedule

_HEIMERSHEIM = "Heimersheim 2024, arXiv 2409.13710"
_BARONI = "Baroni et al. 2025, arXiv 2507.02559"


def heimersheim2024(n_layer: int) -> Recipe:
    # ln2 from step 200, 20 steps per layer; ln1 Q/K every 20; ln1 V every 30; ln_f; EOT special +20;
    # BOS special +100; ~1200 steps of 2^19 tokens on GPT-2 small. σ̂ measured once, never re-estimated.
    spec = RemovalSpec(start=200, gaps={"ln2": 20, "ln1qk": 20, "ln1v": 30, "ln_final": 30},
                       eot_after=20, bos_after=100, tail=40)
    train = TrainConfig(steps=1200, lr=6e-4, min_lr=6e-5, warmup_steps=100, weight_decay=0.1, aux_weight=0.0,
                        ema_momentum=1.0)
    return Recipe("heimersheim2024", spec, train, source=_HEIMERSHEIM)


def _baroni(name: str, n_layer: int, steps: int, gaps: tuple[int, int, int], lr: float, aux: float) -> Recipe:
    # ln2 from step 20, then ln1 Q/K, ln1 V, ln_f at the given gaps; EOT special +2; BOS special +10
    # (the layout of the paper's code, github.com/submarat/removing-layer-norm config.py).
    g2, gqk, gv = gaps
    spec = RemovalSpec(start=20, gaps={"ln2": g2, "ln1qk": gqk, "ln1v": gv, "ln_final": gv},
                       eot_after=2, bos_after=10, tail=0)
    # The tail (fine-tuning after the last event) keeps the published length at the published depth.
    last_event = build_schedule(spec, n_layer, total_steps=10**9).bos_off
    spec = replace(spec, tail=steps - last_event)
    train = TrainConfig(steps=steps, lr=lr, min_lr=lr / 2, warmup_steps=20, weight_decay=0.01, aux_weight=aux,
                        ema_momentum=0.9, grad_clip=1.0)
    return Recipe(name, spec, train, total_steps=steps, source=_BARONI)


BARONI_SIZES = {  # n_layer -> (name, n_layer, steps, gaps ln2/ln1qk/ln1v, lr, aux weight)
    12: ("baroni2025-small", 12, 300, (2, 2, 3), 6e-4, 0.1),
    24: ("baroni2025-medium", 24, 500, (2, 2, 3), 6e-4, 0.1),
    36: ("baroni2025-large", 36, 600, (4, 4, 6), 3e-4, 0.03),
    48: ("baroni2025-xl", 48, 800, (2, 2, 3), 6e-4, 0.01),
}


def _baroni_variant(depth: int) -> Callable[[int], Recipe]:
    """A per-size variant: its published length at its own depth, its tail length at any other."""
    def preset(n_layer: int) -> Recipe:
        recipe = _baroni(*BARONI_SIZES[depth])
        return recipe if n_layer == depth else replace(recipe, total_steps=None)
    return preset


def baroni2025(n_layer: int) -> Recipe:
    """The per-size variant for GPT-2's depths; other depths take the small shape and its tail."""
    return _baroni_variant(n_layer if n_layer in BARONI_SIZES else 12)(n_layer)


def all_at_once(n_layer: int) -> Recipe:
    """Every site frozen at step 0 (after calibration), no specials; Baroni's training settings."""
    spec = RemovalSpec(start=0, gaps={}, eot_after=0, bos_after=0, tail=300)
    train = TrainConfig(steps=300, lr=6e-4, min_lr=3e-4, warmup_steps=20, aux_weight=0.1, ema_momentum=0.9)
    return Recipe("all-at-once", spec, train, source="baseline: no gradual schedule")


PRESETS: dict[str, Callable[[int], Recipe]] = {
    "heimersheim2024": heimersheim2024,
    "baroni2025": baroni2025,
    **{args[0]: _baroni_variant(depth) for depth, args in BARONI_SIZES.items()},
    "all-at-once": all_at_once,
}


def get_recipe(name: str, n_layer: int) -> Recipe:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name](n_layer)


def recipe_schedule(recipe: Recipe, n_layer: int, steps: int | None = None) -> Schedule:
    """The recipe's schedule on n_layer blocks, rescaled to `steps` when the run is longer or shorter."""
    schedule = build_schedule(recipe.removal, n_layer, recipe.total_steps)
    return schedule.rescaled(steps) if steps and steps != schedule.total_steps else schedule
