"""How σ̂ is measured before a run and followed while a site is live. Pure data, no torch (like schedule.py).

The two papers' codes differ here more than anywhere else, so every difference is a field:

* statistic — what one σ̂ value summarises over tokens: "mean_std", the mean per-token std (Baroni et al.'s
  EMA), or "rms_std", sqrt of the mean per-token variance: the pooled std over tokens of the 2024 code's
  precomputed `std_dicts` (their per-token means are ~0 in TransformerLens' centred residual stream), or
  "geo_std", the geometric mean exp(mean log std) (ours): a few tokens 10⁴× above the rest (a real model's
  massive activations while it adapts) move it by a percent where they would move the mean by orders of
  magnitude and leave every ordinary token crushed by the σ̂ they inflated.
* positions — which positions the common σ̂ is measured on: "apart", all but position 0 and EOT positions
  (those are measured into their own special σ̂); "after_bos", all but position 0 (the 2024 code's
  `std_dicts`: positions 1:, EOT tokens included); "pooled", every position (the 2025 code). Position 0's and
  EOT's own values are measured in every case, for the specials.
* ema — "none": σ̂ stays at its calibration (2024); "step": one update per optimizer step from the mean of that
  step's training forwards (ours); "call": one update at every LN call, as the 2025 code's FakeLayerNorm does.
* momentum — the retained fraction of the old σ̂ per update. For "call", per call of the reference's
  micro-batch: with `reference_calls` micro-batches per optimizer step in the reference and n in ours, each of
  our calls keeps momentum^(reference_calls / n), so σ̂ keeps the same fraction per optimizer step whatever the
  micro-batch size. `v_reads`: the 2025 code calls ln_1 once for Q/K and twice for V (plain, then again for the
  EOT positions), so one forward moves the shared σ̂ of ln_1 by three calls.
* tracking — "site": σ̂ stops moving when the site freezes; "norm": the paths of one LayerNorm share σ̂, which
  moves while any of them is live (the 2025 code keeps one buffer per LayerNorm: its frozen Q/K path keeps
  following the EMA until the V path freezes); "until-fixed" (ours): a site's σ̂ follows its input while its
  divisor still depends on the token — live, or frozen with a special weighted in — and stays where it is once
  the site divides by σ̂ alone; the final model divides by those values. A σ̂ fixed at the freeze goes stale as
  the model trains: on SmolLM2-135M after 250 steps the median token sat 2–23 % above its frozen site's σ̂, so
  under the outlier special (k = 1) most tokens kept a live norm and the model never learnt to do without one.
  Following on after the special is gone is worse: σ̂ then chases a scale the model no longer has to hold, and
  held-out CE rose 2.65 → 3.34 in 20 steps at lr 1e-5 (2.65 → 2.53 with σ̂ fixed).
* eot_sigma — the EOT special's σ̂: "eot", measured at EOT positions; "bos", position 0's (the 2024 code).
* special — what a frozen site's position-0 special (`bos_weight`) means: "position", position 0 divides by
  its own σ̂ (both papers); "outlier" (ours), any token whose std is above `outlier_factor` × σ̂ is divided by
  its std / `outlier_factor` instead — a live norm for outliers only (k = 1: their live output), whoever they
  are: a real model writes massive activations at position 0 and at its first delimiter tokens (SmolLM2-135M:
  a space at position 1, 10× the median in block 2, 600× through one frozen SwiGLU), which a position rule
  misses. Eased out like the
  position special (weight w: divisor σ̂ · max(1, std/(k·σ̂))^w), so the final model divides by σ̂ alone.
Training forwards only, in every rule: never evaluation forwards or activation-checkpoint recomputes (the
2025 code also updated its EMA during the Trainer's evaluations — a bug we do not copy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

_CHOICES = {"statistic": ("mean_std", "rms_std", "geo_std"), "special": ("position", "outlier"),
            "positions": ("apart", "after_bos", "pooled"),
            "ema": ("none", "step", "call"), "tracking": ("site", "norm", "until-fixed"), "eot_sigma": ("eot", "bos")}


@dataclass(frozen=True)
class SigmaRule:
    statistic: str = "mean_std"
    positions: str = "apart"
    ema: str = "step"
    momentum: float = 0.9
    reference_calls: int | None = None
    """"call": micro-batches per optimizer step in the reference run the momentum was set for."""
    v_reads: int = 1
    """"call": how often one forward reads the V path (2025 code: 2)."""
    tracking: str = "site"
    eot_sigma: str = "eot"
    special: str = "position"
    outlier_factor: float = 1.0
    """"outlier" special: tokens whose std exceeds this multiple k of σ̂ are divided by std / k (k = 1: they keep
    their live output)."""

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"sigma rule {name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {self.momentum}")
        if self.outlier_factor < 1.0:
            raise ValueError(f"outlier_factor must be at least 1, got {self.outlier_factor}")

    @property
    def collects(self) -> bool:
        """Whether training forwards measure std at all (never with ema "none" or momentum 1)."""
        return self.ema != "none" and self.momentum < 1.0

    def call_momentum(self, micro_batches_per_step: int, reads: int) -> float:
        """"call": the retention of one of our LN calls that stands for `reads` reference calls."""
        scale = self.reference_calls / micro_batches_per_step if self.reference_calls else 1.0
        return self.momentum ** (scale * reads)

    def reads(self, roles: tuple[str, ...]) -> int:
        """Reference calls per forward of a LayerNorm read in these roles ("call" rule; the V path `v_reads` times)."""
        return sum(self.v_reads if role == "ln1v" else 1 for role in roles)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SigmaRule:
        return cls(**d)

    @property
    def logs(self) -> bool:
        """Whether statistics are sums of log std ("geo_std")."""
        return self.statistic == "geo_std"
