"""Plots people would rather look at than read: loss curves with every removal event marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from ..jsonfile import read_jsonl
from ..method.schedule import Schedule
from ..run.record import RUN_FILE, RunRecord, read_record

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402

# Colour by the site's role, read from its name's ending (TransformerLens-style site names, every family).
_EVENT_COLOURS = {"ln2": "tab:blue", "ln1.qk": "tab:orange", "_norm": "tab:purple", "ln1.v": "tab:green",
                  "ln_final": "tab:red"}


def site_colour(site: str) -> tuple[str, str]:
    """(role, colour) of a site name: blocks.3.ln1.qk -> ("ln1.qk", "tab:orange"); Qwen3's q/k norms purple."""
    role = next((key for key in _EVENT_COLOURS if site.endswith(key)), "ln_final")
    return role, _EVENT_COLOURS[role]


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def _mode(run_dir: Path) -> str:
    record = read_record(run_dir)
    return record.mode if record else "?"


def _schedule(run_dir: Path) -> Schedule | None:
    record = read_record(run_dir)
    return record.schedule if record else None


def _smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc = (acc + [v])[-k:]
        out.append(sum(acc) / len(acc))
    return out


def _readable(run: Path) -> bool:
    """A sibling run whose files can be read; a damaged one is left out of this run's figures, not fatal to it."""
    try:
        read_metrics(run), read_record(run)
    except (OSError, ValueError):
        return False
    return True


def _siblings(run_dir: Path) -> list[Path]:
    """Other runs in the same parent folder (an LN-free run and its control usually sit side by side)."""
    return sorted(p for p in run_dir.parent.iterdir()
                  if p != run_dir and p.is_dir() and (p / "metrics.jsonl").exists() and _readable(p))


def _draw_loss(ax, run_dir: Path, others: list[Path]) -> None:
    metrics = read_metrics(run_dir)
    k = max(1, len(metrics) // 60)
    for i, path in enumerate([run_dir] + others):
        rows = metrics if path == run_dir else read_metrics(path)
        if not rows:
            continue
        label = f"{path.name} ({_mode(path)})"
        ax.plot([r["step"] for r in rows], _smooth([r["loss"] for r in rows], k), label=label,
                lw=1.6 if i == 0 else 1.1, alpha=1.0 if i == 0 else 0.8)
    _draw_events(ax, _schedule(run_dir))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"train CE (nats), mean of {k} step(s)")
    ax.set_title(f"{run_dir.name}: loss with removal events")
    ax.legend(fontsize=7, loc="upper right")


def _draw_events(ax, schedule: Schedule | None, legend: bool = True) -> None:
    """A vertical line at each freeze (colour by site kind) and each removal of a special σ̂ (black)."""
    if schedule is None:
        return
    seen = set()
    for site, step in schedule.freeze_at.items():
        kind, colour = site_colour(site)
        ax.axvline(step, color=colour, lw=0.6, alpha=0.5,
                   label=f"freeze {kind}" if legend and kind not in seen else None)
        seen.add(kind)
    for key, label, style in (("eot_off", "EOT special σ̂ removed", ":"), ("bos_off", "BOS special σ̂ removed", "--")):
        for i, step in enumerate(sorted(set(getattr(schedule, key).values()))):
            ax.axvline(step, color="k", ls=style, lw=0.9, label=None if i or not legend else label)


def plot_loss(run_dir: Path, out: Path | None = None) -> Path | None:
    """Loss per step of this run, sibling runs in the same parent folder overlaid (e.g. the vanilla control),
    and a vertical line at each removal event (colour by site kind; specials dashed)."""
    run_dir = Path(run_dir)
    if not read_metrics(run_dir):
        return None
    out = out or run_dir / "loss.png"
    fig, ax = plt.subplots(figsize=(9, 4.8))
    _draw_loss(ax, run_dir, _siblings(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_val(ax, run_dir: Path, others: list[Path]) -> None:
    drawn = False
    for i, path in enumerate([run_dir] + others):
        rows = [r for r in read_metrics(path) if "val_loss" in r]
        if rows:
            ax.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], marker="o", ms=3,
                    lw=1.6 if i == 0 else 1.1, label=f"{path.name} ({_mode(path)})")
            drawn = True
    if not drawn:
        return _note(ax, "no validation CE in metrics.jsonl\n(run with --eval-every N)")
    _draw_events(ax, _schedule(run_dir), legend=False)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation CE (nats)")
    ax.set_title("validation CE")
    ax.legend(fontsize=7)


def _draw_sigma(ax, run_dir: Path) -> None:
    rows = [r for r in read_metrics(run_dir) if "sigma" in r]
    if not rows:
        return _note(ax, "no σ̂ in metrics.jsonl (a control or pretraining run keeps its norms)")
    schedule = _schedule(run_dir)
    freeze_at = schedule.freeze_at if schedule else {}
    steps = [r["step"] for r in rows]
    seen = set()
    for site in rows[0]["sigma"]:
        values = [r["sigma"][site] for r in rows]
        values = [sum(v) / len(v) if isinstance(v, list) else v for v in values]  # per-head sites: mean of heads
        kind, colour = site_colour(site)
        ax.plot(steps, values, color=colour, lw=0.8, alpha=0.7, label=kind if kind not in seen else None)
        seen.add(kind)
        if site in freeze_at and freeze_at[site] in steps:
            ax.plot(freeze_at[site], values[steps.index(freeze_at[site])], "o", color=colour, ms=3)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("σ̂ (dot: frozen from here)")
    ax.set_title("σ̂ of every site")
    ax.legend(fontsize=7)


def residual_std_by_position(model, batch) -> list[float]:
    """Std of the last block's output (hook_resid_post) per position, mean over the batch."""
    import torch

    cache: dict = {}
    with torch.no_grad():
        model(batch, cache=cache)
    return cache[f"blocks.{model.n_layers - 1}.hook_resid_post"].std(-1).mean(0).tolist()


def _draw_residual(ax, run_dir: Path, others: list[Path], cache_root: Path | None) -> None:
    """The original model against each run's final model, on the first sequences of the run's training data."""
    from ..data import SequenceSampler, build_token_cache
    from ..models import load_model
    from ..sources import load_source
    from ..tokenizer import load_tokenizer

    try:
        record = RunRecord.read(run_dir)
        final = run_dir / "final"
        tokenizer = load_tokenizer(final)
        cache = build_token_cache(record.data, tokenizer, split="train", cache_root=cache_root, progress=False)
        ctx = record.train.ctx
        batch = SequenceSampler(cache, ctx, shuffle=False).next_batch(min(8, cache.n_sequences(ctx)))
        curves = {}
        if record.model is not None:
            curves[f"original ({Path(record.model).name})"] = residual_std_by_position(
                load_source(record.model)[0].eval(), batch)
        for path in [run_dir] + others:
            if (path / "final").is_dir():
                curves[f"{path.name} ({_mode(path)})"] = residual_std_by_position(
                    load_model(path / "final").eval(), batch)
    except Exception as e:  # a plot must not fail for want of a model or data: say why in the panel
        return _note(ax, f"residual std by position unavailable:\n{type(e).__name__}: {str(e)[:120]}")
    for label, values in curves.items():
        ax.plot(values, label=label, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("position")
    ax.set_ylabel("residual std, last block (mean over batch)")
    ax.set_title("per-position residual std")
    ax.legend(fontsize=7)


def plot_run(run_dir: Path, others: list[Path] | None = None, out: Path | None = None, residual: bool = True,
             cache_root: Path | None = None) -> Path:
    """One figure for any run (`lnfree plot`): train loss with removal events, validation CE, σ̂ of every site,
    residual std by position (original vs final). `others` are overlaid (default: sibling runs, e.g. the
    control). Written to RUN/plots.png unless `out` is given."""
    run_dir = Path(run_dir)
    if not read_metrics(run_dir):
        raise ValueError(f"{run_dir} holds no metrics.jsonl with steps; give a run folder of `lnfree remove`")
    others = [Path(p) for p in others] if others else _siblings(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    _draw_loss(axes[0, 0], run_dir, others)
    _draw_val(axes[0, 1], run_dir, others)
    _draw_sigma(axes[1, 0], run_dir)
    if residual:
        _draw_residual(axes[1, 1], run_dir, others, cache_root)
    else:
        _note(axes[1, 1], "residual std by position skipped (--no-residual)")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "plots.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_with_siblings(run_dir: Path) -> None:
    """Redraw this run's plot and its siblings', so whichever of an LN-free run and its control finishes last,
    both plots show both curves."""
    run_dir = Path(run_dir)
    plot_loss(run_dir)
    for sibling in _siblings(run_dir):
        if (sibling / RUN_FILE).exists():
            plot_loss(sibling)
