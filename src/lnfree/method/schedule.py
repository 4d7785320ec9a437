"""Removal schedules: a pure map from optimizer step to the state of every norm site. No torch here.

A schedule is data — the step at which each site freezes and when the position-0 (BOS) and EOT special σ̂
are eased out — so it is saved with checkpoints as JSON and printed as a timeline. The state for step s is
what the forward/backward of step s runs with: a site with `freeze_at = 200` is live for steps 0–199 and
frozen from step 200 on.

Site names are the family-independent ones of `lnfree.method.sites`: blocks.{i}.ln2, blocks.{i}.ln1.qk,
blocks.{i}.ln1.v, ln_final.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

SITE_KINDS = ("ln2", "ln1qk", "ln1v", "ln_final")
_SUFFIX = {"ln2": ".ln2", "ln1qk": ".ln1.qk", "ln1v": ".ln1.v"}


def site_name(kind: str, layer: int | None = None) -> str:
    return "ln_final" if kind == "ln_final" else f"blocks.{layer}{_SUFFIX[kind]}"


def site_kind(name: str) -> str:
    """The kind of a site name: blocks.3.ln1.qk -> ln1qk (the inverse of `site_name`)."""
    return next((kind for kind, suffix in _SUFFIX.items() if name.endswith(suffix)), "ln_final")


def all_site_names(n_layer: int) -> list[str]:
    """Every site of an n_layer model, in forward order."""
    per_block = [[site_name(k, i) for k in ("ln1qk", "ln1v", "ln2")] for i in range(n_layer)]
    return [n for block in per_block for n in block] + ["ln_final"]


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
    last EOT removal; `special_gap` 0 removes every site's special in one step, g > 0 one site at a time, in
    removal order, g steps apart; each is eased out linearly over the `*_ramp` steps before it goes (0: in one
    step). Start 0 and no gaps is "all at once".
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
    special_gap: int = 0


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    freeze_at: dict[str, int]  # site -> first frozen step; sites absent stay live (vanilla control: empty)
    eot_off: dict[str, int] = field(default_factory=dict)  # site -> first step without its EOT special
    bos_off: dict[str, int] = field(default_factory=dict)  # sites absent never had that special
    eot_ramp: int = 0
    bos_ramp: int = 0
    rescaled_from: int | None = None  # the preset's length, when stretched to another --steps
    notes: tuple[str, ...] = field(default_factory=tuple)

    # ---- state ----------------------------------------------------------------------------------------------
    @staticmethod
    def _weight(step: int, off: int | None, ramp: int) -> float:
        if off is None:
            return 0.0  # this site never had the special
        if ramp <= 0:
            return 1.0 if step < off else 0.0
        return min(1.0, max(0.0, (off - step) / ramp))

    def state_at(self, step: int) -> dict[str, SiteState]:
        return {site: SiteState(frozen=step >= at,
                                bos_weight=self._weight(step, self.bos_off.get(site), self.bos_ramp),
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
        for offs, ramp, label in ((self.eot_off, self.eot_ramp, "eot"), (self.bos_off, self.bos_ramp, "bos")):
            what = f"{label} special σ̂ removed" + (f" (eased over {ramp} steps)" if ramp else "")
            steps = set(offs.values())
            if len(steps) == 1 and len(offs) > 1:
                ev.append((steps.pop(), "*", f"{what} ({len(offs)} sites)"))
            else:
                ev += [(at, site, what) for site, at in offs.items()]
        order = {s: i for i, s in enumerate(self.freeze_at)}
        return sorted(ev, key=lambda e: (e[0], order.get(e[1], len(order))))

    # ---- transforms ---------------------------------------------------------------------------------------
    def rescaled(self, total_steps: int) -> Schedule:
        """Stretch every event to a run of `total_steps` (rounded to whole steps, order kept)."""
        if total_steps == self.total_steps:
            return self
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


def _special_offs(sites: list[str], kinds: tuple[str, ...], first: int, gap: int) -> dict[str, int]:
    chosen = [s for s in sites if site_kind(s) in kinds]
    return {site: first + i * gap for i, site in enumerate(chosen)}


def build_schedule(spec: RemovalSpec, n_layer: int, total_steps: int | None = None) -> Schedule:
    """Lay a RemovalSpec out over n_layer blocks; the run lasts `total_steps` or, by default, `spec.tail`
    steps past the last event."""
    unknown = (set(spec.order) | set(spec.eot_kinds) | set(spec.bos_kinds)) - set(SITE_KINDS)
    if unknown:
        raise ValueError(f"unknown site kind(s) {sorted(unknown)}; known: {', '.join(SITE_KINDS)}")
    freeze_at: dict[str, int] = {}
    step, previous_kind = spec.start, None
    for kind in spec.order:
        for layer in [None] if kind == "ln_final" else range(n_layer):
            if previous_kind is not None:
                # As in the papers' code: each freeze follows the previous one by the previous site kind's gap,
                # so a phase starts n_layer × gap after the previous phase started.
                step += spec.gaps.get(previous_kind, 0)
            freeze_at[site_name(kind, layer)] = step
            previous_kind = kind
    sites = list(freeze_at)
    eot_off = _special_offs(sites, spec.eot_kinds, step + spec.eot_after, spec.special_gap)
    eot_end = max(eot_off.values(), default=step + spec.eot_after)
    bos_off = _special_offs(sites, spec.bos_kinds, eot_end + spec.bos_after, spec.special_gap)
    schedule = Schedule(total_steps=0, freeze_at=freeze_at, eot_off=eot_off, bos_off=bos_off,
                        eot_ramp=spec.eot_ramp, bos_ramp=spec.bos_ramp)
    last = schedule.last_event
    total = total_steps if total_steps is not None else last + spec.tail
    if total <= last:
        raise ValueError(f"{total} steps is too short for this schedule on {n_layer} layers: the last event is "
                         f"at step {last}; give --steps > {last} (it is rescaled) or a shorter preset")
    return replace(schedule, total_steps=total)


def control_schedule(total_steps: int) -> Schedule:
    """The vanilla control: the same run with every LayerNorm kept live."""
    return Schedule(total_steps=total_steps, freeze_at={})
