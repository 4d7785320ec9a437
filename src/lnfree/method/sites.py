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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .sigma import SigmaRule

# Index of each statistic in a site's accumulators: main (the common σ̂), position 0, EOT positions.
_MAIN, _BOS, _EOT = 0, 1, 2


class NormSite(nn.Module):
    """The switchable divisor of one LN use. Holds σ̂ buffers; owns no trainable parameters. A per-head norm
    (Qwen3's q/k norms, `heads` = H) keeps one σ̂ per head: every σ̂ buffer then has shape (H,)."""

    def __init__(self, name: str, heads: int | None = None):
        super().__init__()
        self.name = name
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

    def extra_repr(self) -> str:
        state = f"frozen σ̂={self.sigma.mean().item():.4g}" if self.frozen else "live"
        return f"{self.name}: {state}"

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen)

    @property
    def normalises(self) -> bool:
        """Whether the divisor still depends on the token: live, or frozen with a position-0 / EOT special still
        weighted in. The one definition every check uses (fold, export, verify, eval)."""
        return not self.is_frozen or bool(self.bos_weight > 0) or bool(self.eot_weight > 0)

    def frozen_divisor(self, batch: int, seq: int, eot_mask: Tensor | None) -> Tensor:
        """σ̂ to divide (B, T, [H,] D) by: a scalar (per head: (H, 1)), or (B, T, [H,] 1) while position-0 / EOT
        specials are still weighted in."""
        sigma = self.sigma
        use_eot = eot_mask is not None and bool(self.eot_weight > 0)
        use_bos = bool(self.bos_weight > 0)
        if not (use_eot or use_bos):
            return sigma.unsqueeze(-1) if sigma.dim() else sigma
        per_pos = sigma.expand(batch, seq, *sigma.shape).clone()  # (B, T, [H])
        if use_eot:
            # Geometric interpolation: weight 1 gives the special σ̂, weight 0 the common one.
            eot_sigma = sigma ** (1 - self.eot_weight) * self.sigma_eot**self.eot_weight
            per_pos = torch.where(eot_mask.view(batch, seq, *([1] * sigma.dim())), eot_sigma, per_pos)
        if use_bos:
            per_pos[:, 0] = sigma ** (1 - self.bos_weight) * self.sigma_bos**self.bos_weight
        return per_pos.unsqueeze(-1)  # (B, T, [H,] 1)

    # ---- statistics -------------------------------------------------------------------------------------
    @torch.no_grad()
    def accumulate(self, std: Tensor, eot_mask: Tensor | None, positions: str = "apart") -> None:
        """Add one forward's per-token std (B, T) — per head (B, T, H) —: position 0 and EOT positions into their
        own sums, and the main sum over the `positions` of the σ̂ rule: all but those ("apart"), all but
        position 0 ("after_bos") or every position ("pooled")."""
        std = std.detach().double()
        special = torch.zeros(std.shape[:2], dtype=torch.bool, device=std.device)  # (B, T)
        special[:, 0] = True
        if eot_mask is not None:
            eot = eot_mask.clone()
            eot[:, 0] = False  # position 0 counts as position 0 even when it holds an EOT token
            special |= eot
            self._add(_EOT, std[eot])
        self._add(_BOS, std[:, 0])
        main = {"apart": std[~special], "after_bos": std[:, 1:], "pooled": std}[positions]
        self._add(_MAIN, main)

    def _add(self, k: int, values: Tensor) -> None:
        """values: (…, [H]) — every leading dimension counts tokens."""
        values = values.reshape(-1, *self.sigma.shape)
        self.stat_sums[k] += values.sum(0)
        self.stat_squares[k] += values.pow(2).sum(0)
        self.stat_counts[k] += values.shape[0]

    @torch.no_grad()
    def update(self, momentum: float, statistic: str = "mean_std") -> None:
        """σ̂ ← m·σ̂ + (1−m)·(the accumulated statistic), for each of main/BOS/EOT that was seen; then empty the
        sums. momentum 0 sets σ̂ to the measurement (calibration); 1 never moves it."""
        for k, buf in ((_MAIN, self.sigma), (_BOS, self.sigma_bos), (_EOT, self.sigma_eot)):
            n = self.stat_counts[k]
            if n > 0:
                value = self.stat_sums[k] / n if statistic == "mean_std" else (self.stat_squares[k] / n).sqrt()
                buf.copy_(momentum * buf + (1 - momentum) * value.to(buf.dtype))
        self.reset()

    def reset(self) -> None:
        self.stat_sums.zero_()
        self.stat_squares.zero_()
        self.stat_counts.zero_()


def reduce_across_ranks(sites: list[NormSite]) -> None:
    """Sum the sites' accumulated statistics over the ranks of a distributed run, so that every rank moves σ̂ by
    the same global measurement (one collective; nothing in one process)."""
    if not sites or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buffers = [b for s in sites for b in (s.stat_sums, s.stat_squares, s.stat_counts)]
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


class RemovableLayerNorm(nn.Module):
    """A LayerNorm (γ, β, eps) — or, with `rms`, an RMSNorm (γ, eps: no centring, no β; Llama, Qwen) — with one
    `NormSite` per path; returns one output per path. For an RMSNorm "std" below means the per-token RMS and a
    frozen site computes x / σ̂ · γ.

    Site names follow TransformerLens conventions: `blocks.{i}.ln1.qk`, `blocks.{i}.ln1.v`, `blocks.{i}.ln2`,
    `ln_final`. `paths=("qk", "v")` gives two sites `{prefix}.qk`, `{prefix}.v`; `paths=("",)` one site `{prefix}`.
    """

    def __init__(self, d_model: int, eps: float, prefix: str, paths: tuple[str, ...] = ("",), rms: bool = False,
                 heads: int | None = None):
        super().__init__()
        self.rms = rms
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = None if rms else nn.Parameter(torch.zeros(d_model))
        self.eps = eps
        self.paths = paths
        self.heads = heads  # a per-head norm: input (B, T, H, d_model), one σ̂ per head
        self.sites = nn.ModuleList(NormSite(f"{prefix}.{p}" if p else prefix, heads) for p in paths)
        self.collecting = False  # switched by `collect_norm_stats`; never checkpointed
        self.rule = SigmaRule()  # set with the run by `LNModel.set_sigma_rule`
        self.call_momentum: float | None = None  # "call" rule: σ̂ moves inside forward with this retention

    def tracked_sites(self) -> list[NormSite]:
        """The sites whose σ̂ still follows the input: the live ones — or, when the paths share σ̂ ("norm"
        tracking), all of them while any is live."""
        live = [s for s in self.sites if not s.is_frozen]
        return list(self.sites) if live and self.rule.tracking == "norm" else live

    @torch.no_grad()
    def ema_step(self, momentum: float, reduce: bool = True) -> None:
        """Fold the collected statistics (summed over ranks unless the caller did: `reduce=False`) into σ̂ of every
        tracked site; frozen, untracked sites never move."""
        if reduce:
            reduce_across_ranks(self.tracked_sites())
        for site in self.tracked_sites():
            site.update(momentum, self.rule.statistic)
            if self.rule.eot_sigma == "bos":
                site.sigma_eot.copy_(site.sigma_bos)
        for site in self.sites:
            site.reset()

    def forward(self, x: Tensor, eot_mask: Tensor | None = None) -> list[Tensor]:
        """x: (B, T, D) → one (B, T, D) output per path."""
        tracked = self.tracked_sites() if self.collecting else []
        if tracked:
            # Measured on the side, without autograd, so the differentiable graph is the same whether or not
            # statistics are collected (activation-checkpoint recomputes must save the same tensors).
            with torch.no_grad():
                std = self.input_std(x)  # (B, T)
                for site in tracked:
                    site.accumulate(std, eot_mask, self.rule.positions)
                if self.call_momentum is not None:
                    self.ema_step(self.call_momentum)
        if not any(s.is_frozen for s in self.sites):
            # All live: one fused norm shared by every path.
            shape = (x.shape[-1],)
            y = (nn.functional.rms_norm(x, shape, self.weight, self.eps) if self.rms
                 else nn.functional.layer_norm(x, shape, self.weight, self.bias, self.eps))
            return [y] * len(self.sites)
        centred = self.centred(x)  # (B, T, D)
        std = None
        if not all(s.is_frozen for s in self.sites):
            std = (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()  # (B, T, 1)
        B, T = x.shape[:2]
        outs, live_out = [], None
        for site in self.sites:
            if site.is_frozen:
                outs.append(self._affine(centred / site.frozen_divisor(B, T, eot_mask)))
                continue
            if live_out is None:  # live paths share one output
                live_out = self._affine(centred / std)
            outs.append(live_out)
        return outs

    def centred(self, x: Tensor) -> Tensor:
        """x minus its per-token mean (LayerNorm), or x itself (RMSNorm)."""
        return x if self.rms else x - x.mean(-1, keepdim=True)

    def _affine(self, y: Tensor) -> Tensor:
        return y * self.weight if self.bias is None else y * self.weight + self.bias

    def input_std(self, x: Tensor) -> Tensor:
        """Per-token std (RMSNorm: RMS) of the input plus eps under the root, (B, T), with the gradient kept
        (Baroni's auxiliary loss needs it)."""
        return (self.centred(x).pow(2).mean(-1) + self.eps).sqrt()
