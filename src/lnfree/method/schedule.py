"""Removal schedules: a pure map from optimizer step to the state of every norm site. No torch here.

A schedule is data — the step at which each site freezes and when the position-0 (BOS) and EOT special σ̂
are eased out — so it is saved with checkpoints as JSON and printed as a timeline. The state for step s is
what the forward/backward of step s runs with: a site with `freeze_at = 200` is live for steps 0–199 and
frozen from step 200 on.

Site names are spelled in one place (`SITE_NAMES`): a family declares which norm plays which role in which block
(`RemovableLayerNorm(roles=…, layer=…)`), and a model's layout is read off its modules (`LNModel.site_layout`); the
schedule orders sites by kind and layer.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace

# Site kinds name the role a norm plays, whatever the family: the norm before the MLP, the pre-attention norm as
# read by Q/K, the per-head norms of queries and keys (Qwen3; they sit on the Q/K path, so they follow it), the
# pre-attention norm as read by V, the final norm. A schedule orders kinds; a family's layout says which site has
# which kind (`LNModel.site_layout`); kinds a model lacks are skipped.
SITE_KINDS = ("ln2", "ln1qk", "qk_norm", "ln1v", "ln_final")


@dataclass(frozen=True)
class SiteSpec:
    """One norm site as the method sees it: its name, the kind that orders it, and its block (None: final)."""

    name: str
    kind: str
    layer: int | None


# The one place site names are spelled (TransformerLens names), for each norm a family can declare: the
# pre-attention norm as read by Q/K and by V, the pre-MLP norm, the per-head query / key norms, the final norm.
SITE_NAMES = {"ln1qk": "blocks.{layer}.ln1.qk", "ln1v": "blocks.{layer}.ln1.v", "ln2": "blocks.{layer}.ln2",
              "q_norm": "blocks.{layer}.attn.q_norm", "k_norm": "blocks.{layer}.attn.k_norm", "ln_final": "ln_final"}


def site_spec(role: str, layer: int | None = None) -> SiteSpec:
    """The site of norm `role` (a key of SITE_NAMES) in block `layer` (None: the final norm): its name and the kind
    that orders it in a schedule (the per-head q and k norms share the kind "qk_norm")."""
    if role not in SITE_NAMES:
        raise ValueError(f"unknown norm role {role!r}; known: {', '.join(SITE_NAMES)}")
    kind = "qk_norm" if role in ("q_norm", "k_norm") else role
    return SiteSpec(SITE_NAMES[role].format(layer=layer), kind, layer)


def layout_depth(layout: list[SiteSpec]) -> int:
    """Blocks spanned by a layout (what per-size presets are picked by)."""
    return 1 + max((s.layer for s in layout if s.layer is not None), default=-1)


def standard_layout(n_layers: int) -> list[SiteSpec]:
    """The sites of a pre-norm transformer with one norm before attention (read apart by Q/K and by V), one
    before the MLP and a final one — GPT-2, GPT-NeoX, Llama alike — in forward order, TransformerLens names."""
    return [site_spec(role, i) for i in range(n_layers) for role in ("ln1qk", "ln1v", "ln2")] + [site_spec("ln_final")]


@dataclass(frozen=True)
class SiteState:
    frozen: bool
    bos_weight: float  # 1: position 0 keeps its special σ̂; 0: it uses the common σ̂
    eot_weight: float  # same for EOT positions


@dataclass(frozen=True)
class RemovalSpec:
    """The shape of a gradual removal, independent of model depth (Heimersheim 2024 / Baroni et al. 2025).

    Sites freeze in `order`, one layer at a time: the first at `start`, each next one the gap of the previous
    site's kind after it (the papers' code: phase k starts n_layer · gap_(k−1) after phase k−1 started).

    Specials: once frozen, a site of a kind in `eot_kinds` divides EOT positions by their own σ̂, and a site of a
    kind in `bos_kinds` does the same for position 0, until the schedule removes that special. The EOT specials
    go from `eot_after` steps after the last freeze, the position-0 specials from `bos_after` steps after the
    last EOT removal; `special_span` 0 removes every site's special in one step, s > 0 one site after another, in
    removal order, spread evenly over s steps; each is eased out over the `*_ramp` steps before it goes (0: in one
    step), linearly — or, for position 0 (and the outlier special), as (steps left / ramp) ** `bos_power`: power 2
    spends most of the ramp at small weights, where a SwiGLU model is closest to losing its last norm. With
    `bos_lag` set, each site's position-0 special goes `bos_lag` steps after that site froze instead (a site
    hardens while the next ones freeze, not all together at the end). Start 0 and no gaps is "all at once".
    """

    start: int
    gaps: dict[str, int]  # site kind -> steps between consecutive freezes of that kind
    eot_after: int
    bos_after: int
    tail: int  # steps of fine-tuning after the last event
    order: tuple[str, ...] = SITE_KINDS
    eot_ramp: int = 0
    bos_ramp: int = 0
    eot_kinds: tuple[str, ...] = ()
    bos_kinds: tuple[str, ...] = ()
    special_span: int = 0
    bos_lag: int | None = None
    bos_power: float = 1.0  # the position-0 / outlier special's weight over its ramp: (steps left / ramp) ** power


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    freeze_at: dict[str, int]  # site -> first frozen step; sites absent stay live (vanilla control: empty)
    eot_off: dict[str, int] = field(default_factory=dict)  # site -> first step without its EOT special
    bos_off: dict[str, int] = field(default_factory=dict)  # sites absent never had that special
    eot_ramp: int = 0
    bos_ramp: int = 0
    bos_power: float = 1.0
    rescaled_from: int | None = None  # the preset's length, when stretched to another --steps
    notes: tuple[str, ...] = field(default_factory=tuple)

    # ---- state ----------------------------------------------------------------------------------------------
    @staticmethod
    def _weight(step: int, off: int | None, ramp: int, power: float = 1.0) -> float:
        if off is None:
            return 0.0  # this site never had the special
        if ramp <= 0:
            return 1.0 if step < off else 0.0
        return min(1.0, max(0.0, (off - step) / ramp)) ** power

    def state_at(self, step: int) -> dict[str, SiteState]:
        return {site: SiteState(frozen=step >= at,
                                bos_weight=self._weight(step, self.bos_off.get(site), self.bos_ramp, self.bos_power),
                                eot_weight=self._weight(step, self.eot_off.get(site), self.eot_ramp))
                for site, at in self.freeze_at.items()}

    def is_complete_at(self, step: int) -> bool:
        """Every scheduled site frozen and every special σ̂ gone: the model can be folded."""
        return bool(self.freeze_at) and all(s.frozen and s.bos_weight == 0 and s.eot_weight == 0
                                            for s in self.state_at(step).values())

    @property
    def last_event(self) -> int:
        return max([*self.freeze_at.values(), *self.eot_off.values(), *self.bos_off.values()], default=0)

    def events(self) -> list[tuple[int, str, str]]:
        """(step, site, event) sorted by step: the timeline a user reads. A special removed from every site
        that had it in one step is one line, site "*"."""
        ev = [(at, site, "freeze") for site, at in self.freeze_at.items()]
        for offs, ramp, power, label in ((self.eot_off, self.eot_ramp, 1.0, "eot"),
                                         (self.bos_off, self.bos_ramp, self.bos_power, "bos")):
            shape = f", weight (steps left / {ramp}) ** {power:g}" if power != 1 else ""
            what = f"{label} special σ̂ removed" + (f" (eased over {ramp} steps{shape})" if ramp else "")
            steps = set(offs.values())
            if len(steps) == 1 and len(offs) > 1:
                ev.append((steps.pop(), "*", f"{what} ({len(offs)} sites)"))
            else:
                ev += [(at, site, what) for site, at in offs.items()]
        order = {s: i for i, s in enumerate(self.freeze_at)}
        return sorted(ev, key=lambda e: (e[0], order.get(e[1], len(order))))

    # ---- transforms ---------------------------------------------------------------------------------------
    def rescaled(self, total_steps: int) -> Schedule:
        """Stretch every event to a run of `total_steps` (rounded to whole steps, order kept). A run so short that
        an event would land at its end or after it is refused, naming the fewest steps that keep every event
        inside the run: the model must be complete at its last step to fold."""
        if total_steps == self.total_steps:
            return self
        out = self._stretched(total_steps)
        if out.last_event >= total_steps:
            # stretching to the preset's own length or more always fits, so the search ends
            least = next(n for n in itertools.count(total_steps + 1) if self._stretched(n).last_event < n)
            raise ValueError(f"--steps {total_steps} is too short for this schedule: its last event would land at "
                             f"step {out.last_event}, past the run's last step ({total_steps - 1}), and the model "
                             f"could not fold; give --steps {least} or more")
        return out

    def _stretched(self, total_steps: int) -> Schedule:
        f = total_steps / self.total_steps
        r = lambda s: int(round(s * f))
        scale = lambda d: {k: r(v) for k, v in d.items()}
        return replace(self, total_steps=total_steps, freeze_at=scale(self.freeze_at), eot_off=scale(self.eot_off),
                       bos_off=scale(self.bos_off), eot_ramp=r(self.eot_ramp), bos_ramp=r(self.bos_ramp),
                       rescaled_from=self.rescaled_from or self.total_steps)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        return cls(**{**d, "notes": tuple(d.get("notes", ()))})

    def format_timeline(self) -> str:
        lines = []
        if self.rescaled_from:
            lines.append(f"# rescaled from the preset's {self.rescaled_from} steps to {self.total_steps}")
        lines.append(f"{'step':>6}  {'site':<20} event")
        lines += [f"{step:>6}  {site:<20} {event}" for step, site, event in self.events()]
        lines.append(f"{self.total_steps:>6}  {'*':<20} end of run ({len(self.freeze_at)} sites)")
        return "\n".join(lines)


def _special_offs(sites: list[SiteSpec], kinds: tuple[str, ...], first: int, span: int) -> dict[str, int]:
    """The step each chosen site loses its special: all at `first`, or spread evenly over `span` steps."""
    chosen = [s.name for s in sites if s.kind in kinds]
    return {site: first + i * span // len(chosen) for i, site in enumerate(chosen)}


def build_schedule(spec: RemovalSpec, layout: list[SiteSpec], total_steps: int | None = None) -> Schedule:
    """Lay a RemovalSpec out over a model's sites (`LNModel.site_layout()`, or `standard_layout(n)`); the run
    lasts `total_steps` or, by default, `spec.tail` steps past the last event."""
    kinds = {s.kind for s in layout}
    unplaced = sorted(kinds - set(spec.order))
    if unplaced:
        raise ValueError(f"this removal order ({', '.join(spec.order)}) does not place site kind(s) "
                         f"{', '.join(unplaced)} of this model; use a preset written for its family")
    freeze_at: dict[str, int] = {}
    step, previous_kind = spec.start, None
    for kind in spec.order:
        for site in sorted((s for s in layout if s.kind == kind), key=lambda s: -1 if s.layer is None else s.layer):
            if previous_kind is not None:
                # As in the papers' code: each freeze follows the previous one by the previous site kind's gap,
                # so a phase starts n_layer × gap after the previous phase started.
                step += spec.gaps.get(previous_kind, 0)
            freeze_at[site.name] = step
            previous_kind = kind
    ordered = sorted(layout, key=lambda s: freeze_at[s.name])  # removal order
    eot_off = _special_offs(ordered, spec.eot_kinds, step + spec.eot_after, spec.special_span)
    eot_end = max(eot_off.values(), default=step + spec.eot_after)
    if spec.bos_lag is None:
        bos_off = _special_offs(ordered, spec.bos_kinds, eot_end + spec.bos_after, spec.special_span)
    else:
        bos_off = {s.name: freeze_at[s.name] + spec.bos_lag for s in ordered if s.kind in spec.bos_kinds}
    schedule = Schedule(total_steps=0, freeze_at=freeze_at, eot_off=eot_off, bos_off=bos_off,
                        eot_ramp=spec.eot_ramp, bos_ramp=spec.bos_ramp, bos_power=spec.bos_power)
    last = schedule.last_event
    total = total_steps if total_steps is not None else last + spec.tail
    if total <= last:
        raise ValueError(f"{total} steps is too short for this schedule on {len(layout)} sites: the last event is "
                         f"at step {last}; give --steps > {last} (it is rescaled) or a shorter preset")
    return replace(schedule, total_steps=total)


def control_schedule(total_steps: int) -> Schedule:
    """The vanilla control: the same run with every LayerNorm kept live."""
    return Schedule(total_steps=total_steps, freeze_at={})
