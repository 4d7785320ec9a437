"""Plots people would rather look at than read: loss curves with every removal event marked."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

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
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc = (acc + [v])[-k:]
        out.append(sum(acc) / len(acc))
    return out


def plot_loss(run_dir: Path, out: Path | None = None) -> Path | None:
    """Loss per step of this run, sibling runs in the same parent folder overlaid (e.g. the vanilla control),
    and a vertical line at each removal event (colour by site kind; specials dashed)."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    if not metrics:
        return None
    out = out or run_dir / "loss.png"
    fig, ax = plt.subplots(figsize=(9, 4.8))
    k = max(1, len(metrics) // 60)
    runs = [run_dir] + sorted(p for p in run_dir.parent.iterdir()
                              if p != run_dir and p.is_dir() and (p / "metrics.jsonl").exists())
    for i, path in enumerate(runs):
        rows = metrics if path == run_dir else read_metrics(path)
        if not rows:
            continue
        label = f"{path.name} ({_run_info(path).get('mode', '?')})"
        ax.plot([r["step"] for r in rows], _smooth([r["loss"] for r in rows], k), label=label,
                lw=1.6 if i == 0 else 1.1, alpha=1.0 if i == 0 else 0.8)
    schedule = _run_info(run_dir).get("schedule", {})
    seen = set()
    for site, step in schedule.get("freeze_at", {}).items():
        kind, colour = site_colour(site)
        ax.axvline(step, color=colour, lw=0.6, alpha=0.5,
                   label=f"freeze {kind}" if kind not in seen else None)
        seen.add(kind)
    for key, label, style in (("eot_off", "EOT special σ̂ removed", ":"), ("bos_off", "BOS special σ̂ removed", "--")):
        for i, step in enumerate(sorted(set(schedule.get(key, {}).values()))):
            ax.axvline(step, color="k", ls=style, lw=0.9, label=None if i else label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"train CE (nats), mean of {k} step(s)")
    ax.set_title(f"{run_dir.name}: loss with removal events")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_with_siblings(run_dir: Path) -> None:
    """Redraw this run's plot and its siblings', so whichever of an LN-free run and its control finishes last,
    both plots show both curves."""
    run_dir = Path(run_dir)
    plot_loss(run_dir)
    for sibling in run_dir.parent.iterdir():
        if sibling != run_dir and (sibling / "metrics.jsonl").exists() and (sibling / "run.json").exists():
            plot_loss(sibling)
