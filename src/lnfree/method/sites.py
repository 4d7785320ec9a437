"""Norm sites: a LayerNorm whose divisor can be switched from the per-token std to a fixed scalar σ̂.

A *site* is one use of a LayerNorm's output. Most LNs have one use; GPT-2's ln_1 has two (Q/K and V), which
Heimersheim (2024) removes separately, so one `RemovableLayerNorm` owns one γ/β pair and one `NormSite`
per path. A site is either

    live    y = (x − mean(x)) / sqrt(var(x) + eps) · γ + β          (the real LN)
    frozen  y = (x − mean(x)) / σ̂ · γ + β                          ("FakeLN": σ̂ a fixed scalar)

While a site is frozen, position 0 (BOS) and EOT positions may keep their own special σ̂ (GPT-2's position 0
has a residual std ~30x the rest), weighted in by `bos_weight` / `eot_weight` ∈ [0, 1] so that a schedule can
ease them out (weight 1: the special σ̂; 0: the common one; between: geometric interpolation).

σ̂ tracking. While live, a site measures the per-token std of its input — but only while `collecting` is
switched on by the training loop around its forward. That excludes evaluation forwards and activation-checkpoint
recomputes (which happen inside backward); the shared ln_1 input is measured once and handed to both paths.
What is measured and when σ̂ moves is the layer's `SigmaRule` (method/sigma.py): once per optimizer step from
the step's mean (`ema_step`), or at every call inside `forward` (the 2025 code's rule), before the outputs are
computed so that an activation-checkpoint recompute sees the σ̂ its forward used.

No host syncs. A site's state lives in buffers (`frozen`, `bos_weight`, `eot_weight`: what checkpoints hold), but
the forward branches on a Python mirror of them, re-read from the device only when a buffer was written or
replaced since the last read (tensor version counters: `set_state`, a state-dict load, `.to()`); statistics are
kept as masked sums on the device, and σ̂ moves without reading them. Under `torch.compile` a layer switched to
`static` computes every path's divisor from the buffers (live and frozen alike, `torch.where`), so the compiled
graph is the same before and after every switch: no graph break and no recompile when a site freezes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import all_reduce_sum_, spans_ranks
from .aux import log_uniformity
from .schedule import SiteSpec, site_spec
from .sigma import SigmaRule

# Index of each statistic in a site's accumulators: main (the common σ̂), position 0, EOT positions.
_MAIN, _BOS, _EOT = 0, 1, 2


class NormSite(nn.Module):
    """The switchable divisor of one LN use. Holds σ̂ buffers; owns no trainable parameters. A per-head norm
    (Qwen3's q/k norms, `heads` = H) keeps one σ̂ per head: every σ̂ buffer then has shape (H,)."""

    def __init__(self, spec: SiteSpec, heads: int | None = None):
        super().__init__()
        self.spec = spec  # name, schedule kind, block
        self.name = spec.name
        shape = () if heads is None else (heads,)
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("sigma", torch.ones(shape))
        self.register_buffer("sigma_bos", torch.ones(shape))
        self.register_buffer("sigma_eot", torch.ones(shape))
        self.register_buffer("bos_weight", torch.tensor(1.0))
        self.register_buffer("eot_weight", torch.tensor(1.0))
        # Sums of per-token std and std², and counts, for (_MAIN, _BOS, _EOT); emptied by every σ̂ update, which
        # happens at an optimizer-step boundary at the latest, so they need not be checkpointed.
        self.register_buffer("stat_sums", torch.zeros(3, *shape, dtype=torch.float64), persistent=False)
        self.register_buffer("stat_squares", torch.zeros(3, *shape, dtype=torch.float64), persistent=False)
        self.register_buffer("stat_counts", torch.zeros(3, dtype=torch.float64), persistent=False)
        # The Python mirror of the state buffers (see `flags`) and what it was read from: (tensor, version) each.
        self._flags, self._values, self._seen = (False, True, True), (False, 1.0, 1.0), None

    def extra_repr(self) -> str:
        state = f"frozen σ̂={self.sigma.mean().item():.4g}" if self.is_frozen else "live"
        return f"{self.name}: {state}"

    # ---- state ------------------------------------------------------------------------------------------
    @property
    def flags(self) -> tuple[bool, bool, bool]:
        """(frozen, position-0 special weighted in, EOT special weighted in), what the forward branches on. Read
        from the buffers (one host read) only when one of them was written or replaced since the last read: a
        version counter says so without touching the device, so a training step reads nothing."""
        buffers = (self.frozen, self.bos_weight, self.eot_weight)
        seen = self._seen
        if seen is None or any(b is not t or b._version != v for b, (t, v) in zip(buffers, seen, strict=True)):
            if any(b.is_meta for b in buffers):
                return self._flags
            frozen, bos, eot = torch.stack([b.detach().float() for b in buffers]).tolist()
            self._values = (frozen > 0, bos, eot)
            self._flags = (frozen > 0, bos > 0, eot > 0)
            self._seen = tuple((b, b._version) for b in buffers)
        return self._flags

    def set_state(self, frozen: bool, bos_weight: float, eot_weight: float) -> None:
        """Put the site in a schedule state; writes the buffers only when the state changes (rarely: at a switch
        or while a special is eased out)."""
        self.flags  # noqa: B018 - brings the mirror up to date with the buffers
        values = (bool(frozen), float(bos_weight), float(eot_weight))
        if values == self._values:
            return
        self.frozen.fill_(values[0])
        self.bos_weight.fill_(values[1])
        self.eot_weight.fill_(values[2])
        self._values, self._flags = values, (values[0], values[1] > 0, values[2] > 0)
        self._seen = tuple((b, b._version) for b in (self.frozen, self.bos_weight, self.eot_weight))

    @property
    def is_frozen(self) -> bool:
        return self.flags[0]

    @property
    def normalises(self) -> bool:
        """Whether the divisor still depends on the token: live, or frozen with a position-0 / EOT special still
        weighted in. The one definition every check uses (fold, export, verify, eval)."""
        frozen, bos, eot = self.flags
        return not frozen or bos or eot

    def frozen_divisor(self, batch: int, seq: int, eot_mask: Tensor | None, position0: bool = True) -> Tensor:
        """σ̂ to divide (B, T, [H,] D) by: a scalar (per head: (H, 1)), or (B, T, [H,] 1) while position-0 / EOT
        specials are still weighted in (`position0` False: the position-0 special is not a position's)."""
        _, use_bos, use_eot = self.flags
        use_bos = use_bos and position0
        use_eot = use_eot and eot_mask is not None
        if not (use_eot or use_bos):
            sigma = self.sigma
            return sigma.unsqueeze(-1) if sigma.dim() else sigma
        return self.divisor_by_position(batch, seq, eot_mask if use_eot else None, use_bos)

    def divisor_by_position(self, batch: int, seq: int, eot_mask: Tensor | None, bos: bool = True) -> Tensor:
        """(B, T, [H,] 1): σ̂ with the EOT special at `eot_mask` and (with `bos`) the position-0 special, each at
        its weight — weight 0 gives the common σ̂ (or at position 0 the EOT special) exactly, so this is the frozen
        divisor in every state."""
        sigma = self.sigma
        per_pos = sigma.expand(batch, seq, *sigma.shape).clone()  # (B, T, [H])
        if eot_mask is not None:
            # Geometric interpolation: weight 1 gives the special σ̂, weight 0 the common one.
            eot_sigma = sigma ** (1 - self.eot_weight) * self.sigma_eot**self.eot_weight
            per_pos = torch.where(eot_mask.view(batch, seq, *([1] * sigma.dim())), eot_sigma, per_pos)
        if bos:  # position 0 takes its special while it is weighted in (after that, an EOT there takes EOT's)
            first = sigma ** (1 - self.bos_weight) * self.sigma_bos**self.bos_weight
            per_pos[:, 0] = torch.where(self.bos_weight > 0, first, per_pos[:, 0])
        return per_pos.unsqueeze(-1)  # (B, T, [H,] 1)

    # ---- statistics -------------------------------------------------------------------------------------
    def add_measurement(self, sums: tuple[Tensor, Tensor, Tensor]) -> None:
        """Add `measure`'s (sums, squares, counts), on the device."""
        self.stat_sums.add_(sums[0])  # in place, not `+=`: no module attribute is set (a graph break under compile)
        self.stat_squares.add_(sums[1])
        self.stat_counts.add_(sums[2])

    @torch.no_grad()
    def update(self, momentum: float, statistic: str = "mean_std", active: Tensor | None = None,
               sums: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
        """σ̂ ← m·σ̂ + (1−m)·(the statistic), for each of main/BOS/EOT that was seen (and, given the bool tensor
        `active`, only where it holds): from `sums` (one `measure`; the per-call rule, which never accumulates), or
        from the accumulated sums, which are then emptied. momentum 0 sets σ̂ to the measurement (calibration); 1
        never moves it. Decided on the device: nothing is read back."""
        total, squares, n = sums if sums is not None else (self.stat_sums, self.stat_squares, self.stat_counts)
        n = n.view(3, *([1] * self.sigma.dim()))
        mean = total / n.clamp(min=1)
        value = {"mean_std": mean, "geo_std": mean.exp()}.get(statistic, (squares / n.clamp(min=1)).sqrt())
        seen = n > 0 if active is None else (n > 0) & active
        buffers = (self.sigma, self.sigma_bos, self.sigma_eot)  # _MAIN, _BOS, _EOT
        old = torch.stack(buffers)  # (3, [H])
        new = torch.where(seen, momentum * old + (1 - momentum) * value.to(old.dtype), old)
        for k, buf in enumerate(buffers):
            buf.copy_(new[k])
        if sums is None:
            self.reset()

    def reset(self) -> None:
        self.stat_sums.zero_()
        self.stat_squares.zero_()
        self.stat_counts.zero_()


def measure(std: Tensor, eot_mask: Tensor | None, positions: str = "apart") -> tuple[Tensor, Tensor, Tensor]:
    """Sums of one forward's per-token std (B, T) — per head (B, T, H) — and of its square, and token counts, for
    (main, position 0, EOT positions): position 0 and EOT positions in their own groups, and the main group over
    the `positions` of the σ̂ rule: all but those ("apart"), all but position 0 ("after_bos") or every position
    ("pooled"). Masked sums in float64 on the device (no data-dependent shapes, nothing read back)."""
    std = std.detach().double()
    B, T = std.shape[:2]
    bos = torch.zeros(B, T, dtype=torch.bool, device=std.device)
    bos[:, 0] = True
    # position 0 counts as position 0 even when it holds an EOT token
    eot = eot_mask & ~bos if eot_mask is not None else torch.zeros_like(bos)
    main = {"apart": ~(bos | eot), "after_bos": ~bos, "pooled": torch.ones_like(bos)}[positions]
    masks = torch.stack([main, bos, eot]).double()  # (3, B, T)
    weights = masks.view(3, B, T, *([1] * (std.dim() - 2)))
    return (weights * std).sum((1, 2)), (weights * std.square()).sum((1, 2)), masks.sum((1, 2))


def reduce_across_ranks(sites: list[NormSite]) -> None:
    """Sum the sites' accumulated statistics over the ranks of a distributed run, so that every rank moves σ̂ by
    the same global measurement (one collective; nothing in one process)."""
    if sites:
        sum_across_ranks([b for s in sites for b in (s.stat_sums, s.stat_squares, s.stat_counts)])


def sum_across_ranks(tensors: list[Tensor]) -> None:
    """All-reduce (sum) `tensors` in place, in one collective; nothing in one process."""
    if not tensors or not spans_ranks():
        return
    flat = all_reduce_sum_(torch.cat([b.reshape(-1) for b in tensors]))
    offset = 0
    for b in tensors:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


class RemovableLayerNorm(nn.Module):
    """A LayerNorm (γ, β, eps) — or, with `rms`, an RMSNorm (γ, eps: no centring, no β; Llama, Qwen) — with one
    `NormSite` per path; returns one output per path. For an RMSNorm "std" below means the per-token RMS and a
    frozen site computes x / σ̂ · γ.

    `roles` says what reads the norm, one site each, named by `schedule.site_spec` (TransformerLens names):
    ("ln1qk", "ln1v") for a pre-attention norm read apart by Q/K and by V (`blocks.{layer}.ln1.qk`, `.ln1.v`),
    ("ln2",), ("q_norm",) / ("k_norm",) in block `layer`, or ("ln_final",).
    """

    def __init__(self, d_model: int, eps: float, roles: tuple[str, ...], layer: int | None = None, rms: bool = False,
                 heads: int | None = None):
        super().__init__()
        self.rms = rms
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = None if rms else nn.Parameter(torch.zeros(d_model))
        self.eps = eps
        self.roles = roles
        self.heads = heads  # a per-head norm: input (B, T, H, d_model), one σ̂ per head
        self.sites = nn.ModuleList(NormSite(site_spec(role, layer), heads) for role in roles)
        self.collecting = False  # switched by `collect_norm_stats`; never checkpointed
        self.rule = SigmaRule()  # set with the run by `LNModel.set_sigma_rule`
        self.call_momentum: float | None = None  # "call" rule: σ̂ moves inside forward with this retention
        self.static = False  # one graph for every site state (torch.compile): `LNModel.set_static_graph`
        self.uniformity: list[Tensor] | None = None  # "sites" aux loss: each forward appends its term here
        self.uniformity_worst = False  # "sites-worst": each term adds its sequences' most outlying token

    def tracked_sites(self) -> list[NormSite]:
        """The sites whose σ̂ still follows the input: the live ones — or, when the paths share σ̂ ("norm"
        tracking), all of them while any is live; with "until-fixed", every site that still normalises."""
        if self.rule.tracking == "until-fixed":
            return [s for s in self.sites if s.normalises]
        live = [s for s in self.sites if not s.is_frozen]
        return list(self.sites) if live and self.rule.tracking == "norm" else live

    def _tracked_masks(self) -> list[Tensor]:
        """`tracked_sites` as one bool tensor per site, computed on the device from the state buffers."""
        live = [~s.frozen for s in self.sites]
        if self.rule.tracking == "until-fixed":
            return [~s.frozen | (s.bos_weight > 0) | (s.eot_weight > 0) for s in self.sites]
        if self.rule.tracking == "norm":
            anyone = torch.stack(live).any()
            return [anyone] * len(live)
        return live

    @torch.no_grad()
    def ema_step(self, momentum: float, reduce: bool = True) -> None:
        """Fold the collected statistics (summed over ranks unless the caller did: `reduce=False`) into σ̂ of every
        tracked site; frozen, untracked sites never move."""
        if self.static:  # which sites are tracked is decided on the device: the same graph in every state
            if reduce:
                reduce_across_ranks(list(self.sites))
            for site, active in zip(self.sites, self._tracked_masks(), strict=True):
                site.update(momentum, self.rule.statistic, active)
                if self.rule.eot_sigma == "bos":
                    site.sigma_eot.copy_(torch.where(active, site.sigma_bos, site.sigma_eot))
            return
        if reduce:
            reduce_across_ranks(self.tracked_sites())
        for site in self.tracked_sites():
            site.update(momentum, self.rule.statistic)
            if self.rule.eot_sigma == "bos":
                site.sigma_eot.copy_(site.sigma_bos)
        for site in self.sites:
            site.reset()

    def _update_now(self, sums: tuple[Tensor, Tensor, Tensor]) -> None:
        """The per-call rule: σ̂ of the tracked sites moves by this call's measurement (summed over ranks) at once,
        without passing through the accumulators."""
        sum_across_ranks(list(sums))
        if self.static:
            pairs = list(zip(self.sites, self._tracked_masks(), strict=True))
        else:
            pairs = [(site, None) for site in self.tracked_sites()]
        for site, active in pairs:
            site.update(self.call_momentum, self.rule.statistic, active, sums)
            if self.rule.eot_sigma == "bos":
                site.sigma_eot.copy_(site.sigma_bos if active is None else
                                     torch.where(active, site.sigma_bos, site.sigma_eot))

    def forward(self, x: Tensor, eot_mask: Tensor | None = None) -> list[Tensor]:
        """x: (B, T, D) → one (B, T, D) output per path."""
        tracked = (list(self.sites) if self.static else self.tracked_sites()) if self.collecting else []
        if self.uniformity is not None:  # the "sites" auxiliary loss reads every norm's input std, with its gradient
            self.uniformity.append(log_uniformity(self.input_std(x), eot_mask, self.uniformity_worst))
        if self.static:
            return self._forward_static(x, eot_mask, tracked)
        if tracked:  # before any output: the per-call rule moves σ̂ first
            with torch.no_grad():
                self._measure(self.input_std(x), eot_mask, tracked)
        frozen = [s.is_frozen for s in self.sites]
        live_out = None
        if not all(frozen):  # live paths share one output of the fused norm
            shape = (x.shape[-1],)
            live_out = (nn.functional.rms_norm(x, shape, self.weight, self.eps) if self.rms
                        else nn.functional.layer_norm(x, shape, self.weight, self.bias, self.eps))
        if not any(frozen):
            return [live_out] * len(self.sites)
        centred = self.centred(x)  # (B, T, D)
        B, T = x.shape[:2]
        outliers = self.rule.special == "outlier"
        return [self._frozen(centred, self._outlier_divisor(centred, site, site.frozen_divisor(B, T, eot_mask, False))
                             if outliers and site.flags[1] else site.frozen_divisor(B, T, eot_mask, not outliers))
                if f else live_out for site, f in zip(self.sites, frozen, strict=True)]

    def _outlier_divisor(self, centred: Tensor, site: NormSite, divisor: Tensor, std: Tensor | None = None) -> Tensor:
        """The "outlier" special (SigmaRule.special) at its weight w: σ̂ · max(1, std / (k·σ̂))^w per token, so that
        at w = 1 no token leaves the site more than k× the size of an ordinary one; (B, T, [H,] 1)."""
        if std is None:
            std = (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()  # (B, T, [H,] 1)
        if divisor.dim() != std.dim():
            divisor = divisor.expand(std.shape[:-1] + divisor.shape[-1:]) if divisor.dim() else divisor.expand_as(std)
        excess = (std / (self.rule.outlier_factor * divisor)).clamp(min=1)
        return divisor * excess ** site.bos_weight

    @torch.no_grad()
    def _measure(self, std: Tensor, eot_mask: Tensor | None, tracked: list[NormSite]) -> None:
        """One forward's per-token std (B, T, [H]) into the tracked sites' statistics — or, with the per-call rule,
        straight into their σ̂. Measured on the side, without autograd, so the differentiable graph is the same
        whether or not statistics are collected (activation-checkpoint recomputes must save the same tensors);
        measured once for every path that reads this input."""
        sums = measure(std.log() if self.rule.logs else std, eot_mask, self.rule.positions)
        if self.call_momentum is not None:
            self._update_now(sums)
        else:
            for site in tracked:
                site.add_measurement(sums)

    def _forward_static(self, x: Tensor, eot_mask: Tensor | None, tracked: list[NormSite]) -> list[Tensor]:
        """The same outputs, every path's divisor chosen on the device: the per-token std where the site is live,
        σ̂ with its specials at their weights where frozen. No Python branch reads a site's state, so a compiled
        graph serves every schedule state (the extra elementwise work fuses into the norm's kernel)."""
        centred = self.centred(x)  # (B, T, [H,] D)
        std = (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()  # (B, T, [H,] 1)
        if tracked:
            self._measure(std.detach().squeeze(-1), eot_mask, tracked)
        B, T = x.shape[:2]
        outliers = self.rule.special == "outlier"
        divisors = [site.divisor_by_position(B, T, eot_mask, not outliers) for site in self.sites]
        if outliers:  # weight 0 gives σ̂ exactly, so the same graph serves every state
            divisors = [self._outlier_divisor(centred, site, d, std)
                        for site, d in zip(self.sites, divisors, strict=True)]
        return [self._affine(centred / torch.where(site.frozen, d, std))
                for site, d in zip(self.sites, divisors, strict=True)]

    def centred(self, x: Tensor) -> Tensor:
        """x minus its per-token mean (LayerNorm), or x itself (RMSNorm)."""
        return x if self.rms else x - x.mean(-1, keepdim=True)

    def _affine(self, y: Tensor) -> Tensor:
        return y * self.weight if self.bias is None else torch.addcmul(self.bias, y, self.weight)

    def _frozen(self, centred: Tensor, divisor: Tensor) -> Tensor:
        """centred / σ̂ · γ + β. A σ̂ shared by every position (a scalar, or one per head) goes into γ first, so the
        (B, T, D) tensor sees one fused multiply-add instead of a division, a product and a sum (eager CPU: the
        frozen site's cost is these passes)."""
        if divisor.dim() == centred.dim():  # per position: position-0 / EOT specials still weighted in
            return self._affine(centred / divisor)
        scale = self.weight / divisor  # (D,), or (H, D) per head
        return centred * scale if self.bias is None else torch.addcmul(self.bias, centred, scale)

    def input_std(self, x: Tensor) -> Tensor:
        """Per-token std (RMSNorm: RMS) of the input plus eps under the root, (B, T), with the gradient kept
        (Baroni's auxiliary loss needs it). A token whose square leaves the float range (|x| past ~1.8e19: one that
        runs away through frozen SwiGLU blocks, which square its scale, while its value is still finite) counts as
        the largest finite std instead of inf, so the log-space auxiliary loss stays finite — its terms at the sites
        the token passed before it overflowed pull it back — and σ̂'s statistics stay finite (SmolLM2-135M,
        2026-12-08: one rare token, ' nargs', reached ~10²⁴ with the CE still finite, and an inf std stopped the
        run). Finite values are unchanged, bit for bit."""
        std = (self.centred(x).pow(2).mean(-1) + self.eps).sqrt()  # (torch.var is ~10× slower on CPU)
        return std.clamp(max=torch.finfo(std.dtype).max)
