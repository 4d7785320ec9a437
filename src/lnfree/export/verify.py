"""`lnfree verify`: evidence that a model is LN-free in the sense interpretability needs.

Three checks, each with a figure:
  (a) structure — no LayerNorm / RMSNorm module and no live norm site remains once the model is folded
      (frozen sites without specials fold away and do not count);
  (b) direct logit attribution is exact — from our activation cache, on random token batches,
        logits = U(hook_embed) + U(hook_pos_embed) + Σ_{l,h} U(z_{l,h} W_O,l,h) + Σ_l U(mlp_out_l)
                 + U(Σ_l b_O,l) + b_U
      with U the linear read-out (x ↦ x W_Uᵀ): `dla_max_abs_error`. Beside it `dla_relative_error`, the
      measure of Baroni et al. (2025): Σ|DLA_c − DE_c| / Σ|DE_c| over components c and positions, where DE_c is
      the direct effect (the top logit minus that logit with c removed from the final residual and the final
      norm recomputed). With a live final LayerNorm the read-out must assume a fixed scale (the mean per-token
      scale of the batch), so (b) quantifies how far attributions are from effects; without one both are ~0;
  (c) every export format reloads with parity — written to a temporary folder and compared; a format that
      cannot express the model (hf-compat for a head trained untied) is reported "n/a (unsupported …)" and
      does not fail the check.
(b) and (c) are evaluated in float64 from the stored fp32 weights, so they measure exactness rather than
float32 rounding, which grows with the logit scale (on a GPT-2-small-shaped model with logits up to ~260,
fp32 differs from fp64 by ~8e-4). Their gates are what a correct fold achieves there, with margin: DLA within
`DLA_ABS_TOL` (measured ~1e-14), exports within `PARITY_TOL` of their format.
A model with live normalization fails (a) and (b) with the offending sites and errors named; (c) is then
skipped, since such a model cannot be exported.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..method.fold import normalising_sites
from ..models.base import LNModel
from ..sources import load_source
from .core import FORMATS, as_norm_free, parity_tolerance, reload_parity, sample_batches, write_format

DLA_REL_TOL = 1e-4  # Σ|DLA − DE| / Σ|DE|; float rounding of a norm-free model gives ~1e-7
DLA_ABS_TOL = 1e-8  # max-abs logits missed by the linear decomposition, in float64 (measured ~1e-14)


@dataclass
class VerifyReport:
    model: str
    norm_modules: list[str]  # module paths that still normalise (empty when none)
    live_sites: list[str]  # norm sites that are live or keep a special σ̂
    dla_max_abs_error: float
    dla_relative_error: float
    exports: dict[str, float | str] = field(default_factory=dict)  # format → max-abs error, or why not run
    export_gates: dict[str, float] = field(default_factory=dict)  # format → the error it must stay within

    @property
    def failures(self) -> list[str]:
        out = []
        if self.live_sites or self.norm_modules:
            sites = f"{len(self.live_sites)} live norm site(s) ({_preview(self.live_sites)})" if self.live_sites else ""
            mods = f"normalization modules {_preview(self.norm_modules)}" if self.norm_modules else ""
            out.append("normalization remains: " + "; ".join(x for x in (sites, mods) if x))
        if math.isnan(self.dla_max_abs_error):
            out.append("the logits are not finite (NaN or inf in float64) on the check's random token batches: an "
                       "activation overflows, so the model is unstable off its training text, and neither DLA nor "
                       "export parity can be measured")
        elif not (self.dla_max_abs_error <= DLA_ABS_TOL and self.dla_relative_error <= DLA_REL_TOL):
            out.append(f"direct logit attribution is not exact: DLA differs from the direct effect by "
                       f"{100 * self.dla_relative_error:.1f}% (relative), and the linear decomposition misses the "
                       f"logits by up to {self.dla_max_abs_error:.3g}")
        for fmt, value in self.exports.items():
            if isinstance(value, float) and not value <= self.export_gates[fmt]:
                out.append(f"{fmt} export parity {value:.2e} > {self.export_gates[fmt]:.1e}")
            elif isinstance(value, str) and value.startswith("error"):
                out.append(f"{fmt} export {value}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def figures(self) -> list[str]:
        lines = [f"norm_modules={len(self.norm_modules)}", f"live_norm_sites={len(self.live_sites)}",
                 f"dla_max_abs_error={self.dla_max_abs_error:.3e}", f"dla_relative_error={self.dla_relative_error:.3e}"]
        for fmt in FORMATS:
            value = self.exports.get(fmt, "skipped")
            key = f"export_{fmt.replace('-', '_')}_max_abs"
            lines.append(f"{key}={value:.3e}" if isinstance(value, float) else f"{key}=n/a ({value})")
        return lines


def _preview(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "")


# ---- (a) structure ---------------------------------------------------------------------------------------------
def normalization_modules(model: nn.Module) -> list[str]:
    """Paths of modules that normalise: nn.LayerNorm / RMSNorm (any library) and our removable LNs."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm)))
            or any(k in type(m).__name__ for k in ("LayerNorm", "RMSNorm"))]





# ---- (b) direct logit attribution --------------------------------------------------------------------------
def _read_out(model: LNModel, resid: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor],
                                                      Callable[[Tensor], Tensor]]:
    """(W_U (V, D), b_U (V,), linear read-out used for attribution, the model's true final map before W_U)."""
    w_u, b_u, ln = model.unembedding()
    b_u = torch.zeros(w_u.shape[0], dtype=w_u.dtype, device=w_u.device) if b_u is None else b_u
    if ln is None:  # norm-free: the read-out is linear and exact
        return w_u, b_u, (lambda x: x), (lambda x: x)
    # LN model: γ and β go into W_U / b_U; the per-token scale is replaced by its batch mean for attribution
    site = ln.sites[0]
    w_u, b_u = w_u * ln.weight, (w_u @ ln.bias if ln.bias is not None else 0) + b_u
    scale = ln.input_std(resid).mean()

    def final(x: Tensor) -> Tensor:
        divisor = site.sigma if site.is_frozen else ln.input_std(x).unsqueeze(-1)
        return ln.centred(x) / divisor

    return w_u, b_u, (lambda x: ln.centred(x) / scale), final


@torch.no_grad()
def dla_errors(model: LNModel, batches: list[Tensor]) -> tuple[float, float]:
    """(max-abs error of the linear logit decomposition, relative DLA-vs-direct-effect error)."""
    max_abs, num, den = torch.zeros((), dtype=torch.float64), 0.0, 0.0
    for idx in batches:
        cache: dict[str, Tensor] = {}
        logits = model(idx, cache=cache)  # (B, T, V)
        _, comps = model.residual_components(cache)  # (N, B, T, D)
        resid = cache[f"blocks.{model.n_layers - 1}.hook_resid_post"]  # (B, T, D)
        w_u, b_u, readout, final = _read_out(model, resid)
        attributed = readout(comps)  # (N, B, T, D)
        decomposed = torch.einsum("nbtd,vd->btv", attributed, w_u) + b_u
        max_abs = torch.maximum(max_abs, (decomposed - logits).abs().max())  # NaN logits stay NaN
        w_top = w_u[logits.argmax(-1)]  # (B, T, D): attribute the predicted token's logit
        dla = (attributed * w_top).sum(-1)  # (N, B, T)
        de = (final(resid) * w_top).sum(-1) - (final(resid.unsqueeze(0) - comps) * w_top).sum(-1)  # (N, B, T)
        num += (dla - de).abs().sum().item()
        den += de.abs().sum().item()
    return max_abs.item(), num / max(den, 1e-30)


# ---- (c) exports ----------------------------------------------------------------------------------------------
def export_parity(model: LNModel) -> tuple[dict[str, float | str], dict[str, float]]:
    """Write every format into a temporary folder, reload it: (max-abs logit errors (or why not), their gates)."""
    from .compat import HeadNotTiedError

    out: dict[str, float | str] = {}
    gates = {fmt: parity_tolerance(fmt, model) for fmt in FORMATS}
    with tempfile.TemporaryDirectory(prefix="lnfree-verify-") as tmp:
        for fmt in FORMATS:
            folder = Path(tmp) / fmt
            try:
                write_format(model, folder, fmt)
                out[fmt] = max(reload_parity(folder, fmt, model)[0].values())
            except HeadNotTiedError as e:
                out[fmt] = f"unsupported: {str(e).split(';')[0]}"
            except Exception as e:  # a broken export is a verification failure, reported in one line
                out[fmt] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out, gates


def verify(model_or_path: LNModel | str | os.PathLike, exports: bool = True,
           batches: list[Tensor] | None = None) -> VerifyReport:
    """Run checks (a)–(c) on a model object or any source `lnfree export` reads."""
    if isinstance(model_or_path, LNModel):
        model, name = model_or_path, getattr(model_or_path, "source", type(model_or_path).__name__)
    else:
        model, name = load_source(model_or_path, unfinished_runs=True)[0], str(model_or_path)
    model.eval()
    sites = normalising_sites(model)
    if not sites and model.has_normalization:
        model, _ = as_norm_free(model, name)  # frozen, no specials: fold, then check what is left
    batches = batches if batches is not None else sample_batches(model)
    max_abs, rel = dla_errors(copy.deepcopy(model).double(), batches)  # float64: exactness, not rounding
    report = VerifyReport(str(name), normalization_modules(model), sites, max_abs, rel)
    if exports:
        if math.isnan(max_abs):
            report.exports = {f: "skipped: non-finite logits" for f in FORMATS}
        elif sites:
            report.exports = {f: "skipped: live normalization" for f in FORMATS}
        else:
            report.exports, report.export_gates = export_parity(model)
    return report
