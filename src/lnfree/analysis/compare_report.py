"""`lnfree compare`'s report: report.md with the headline figures and per-component tables, report.json with
everything, and figures — per-head attention similarity beside the patching-effect maps, per-layer DLA agreement,
entropy histograms with reliability diagrams, neuron correlations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LABELS = {"original": "original", "lnfree": "LN-free", "vanilla": "vanilla"}
COLOURS = {"original": "tab:blue", "lnfree": "tab:red", "vanilla": "tab:green"}


def headline(r: dict[str, Any]) -> list[str]:
    """The figures a reader wants first, one per line."""
    out, mech = r["outputs"], r["mechanism"]["lnfree"]
    m = out["models"]
    lines = [f"KL(original ‖ LN-free) {_kl(out['kl_to_lnfree']['original'])}"]
    if "vanilla" in out["kl_to_lnfree"]:
        lines.append(f"KL(vanilla ‖ LN-free) {_kl(out['kl_to_lnfree']['vanilla'])}")
    lines.append("top-1 agreement with LN-free: " + ", ".join(
        f"{LABELS[n]} {v:.1%}" for n, v in out["top1_agreement_with_lnfree"].items()))
    lines.append("entropy (nats): " + ", ".join(f"{LABELS[n]} {s['entropy']:.3f}" for n, s in m.items()))
    lines.append("ECE: " + ", ".join(f"{LABELS[n]} {s['ece']:.4f}" for n, s in m.items()))
    lines.append(f"mean attention similarity, original vs LN-free: {mech['mean_attention_similarity']:.4f}"
                 + _control(r, "mean_attention_similarity"))
    lines.append("DLA correlation per layer, original vs LN-free: "
                 + " ".join(f"{row['correlation']:.3f}" for row in mech["dla_per_layer"]))
    for name, p in r["patching"].items():
        lines.append(f"patching-map correlation on {name} ({p['rows']} pairs), original vs LN-free: "
                     f"{p['correlation']['lnfree']:.3f}"
                     + (f" (vanilla {p['correlation']['vanilla']:.3f})" if "vanilla" in p["correlation"] else ""))
    return lines


def _kl(s: dict) -> str:
    return f"{s['mean']:.4f} nats/token (median {s['median']:.4f}, p95 {s['p95']:.4f}, p99.9 {s['p999']:.3f})"


def _control(r: dict, key: str) -> str:
    v = r["mechanism"].get("vanilla")
    return f" (control, original vs vanilla: {v[key]:.4f})" if v else ""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else ("n/a" if x is None else str(x))
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows])


def markdown(r: dict[str, Any], figures: list[str], top: int = 10) -> str:
    out, mech = r["outputs"], r["mechanism"]["lnfree"]
    d = r["data"]
    parts = ["# lnfree compare: original vs LN-free" + (" (and vanilla)" if "vanilla" in r["models"] else ""),
             "", "\n".join(f"- {LABELS[n]}: `{m['source']}`" for n, m in r["models"].items()),
             f"- data: `{d['name']}`, {r['sequences']} sequences of {d['ctx']} tokens, {r['tokens']:,} predictions "
             "(the evaluation protocol: no BOS, every next-token prediction)"]
    if r.get("command"):
        parts += ["", f"Command: `{r['command']}`"]
    parts += ["", "## Headline", "", "\n".join(f"- {line}" for line in headline(r)), "", "## Outputs", "",
              _table(["model", "CE", "entropy", "ECE", "accuracy", "mean confidence", "KL(· ‖ LN-free) mean",
                      "p99.9", "top-1 agreement with LN-free", "DLA error vs direct effect"],
                     [[LABELS[n], s["ce"], s["entropy"], s["ece"], s["accuracy"], s["confidence"],
                       out["kl_to_lnfree"].get(n, {}).get("mean"), out["kl_to_lnfree"].get(n, {}).get("p999"),
                       out["top1_agreement_with_lnfree"].get(n), s["dla_error_vs_direct_effect"]]
                      for n, s in out["models"].items()]),
              "", "DLA error vs direct effect: Σ|DLA − DE| / Σ|DE| over components and tokens — 0 on an LN-free model, "
              "where attribution is exact; on a model with a final norm the attribution freezes its per-token scale.",
              "", "## Mechanism: original vs LN-free", "",
              "Mean attention-pattern similarity (1 − JS/ln 2 per query row): "
              f"**{mech['mean_attention_similarity']:.4f}**" + _control(r, "mean_attention_similarity") + ".", "",
              f"Heads whose attention changed most (of {len(mech['heads_by_similarity'])}):", "",
              _table(["head", "similarity"], [[h["head"], h["similarity"]] for h in mech["heads_by_similarity"][:top]]),
              "", "Direct logit attribution to the correct token (vs the vocabulary mean), per layer (heads + MLP):",
              "",
              _table(["layer", "correlation", "mean \\|DLA\\| original", "mean \\|DLA\\| LN-free"]
                     + (["correlation (control: vanilla)"] if "vanilla" in r["mechanism"] else []),
                     [[row["layer"], row["correlation"], row["mean_abs_original"], row["mean_abs_model"]]
                      + ([r["mechanism"]["vanilla"]["dla_per_layer"][i]["correlation"]]
                         if "vanilla" in r["mechanism"] else [])
                      for i, row in enumerate(mech["dla_per_layer"])]),
              "", "Heads whose attribution changed most (relative change rms(a − b)/rms(a, b)):", "",
              _table(["head", "relative change", "correlation", "mean DLA original", "mean DLA LN-free"],
                     [[c["component"], c["relative_change"], c["correlation"], c["mean_original"], c["mean_model"]]
                      for c in mech["heads_by_dla_change"][:top]]),
              "", "MLP neurons, activation correlation at the same index; mean per layer: "
              + ", ".join(f"{c:.3f}" for c in mech["neurons"]["mean_correlation_per_layer"])
              + ". The neurons that changed most (unembed ratio ≪ 1: writes into the unembedding's null space, as "
              "entropy neurons do):", "",
              _table(["layer", "neuron", "correlation", "mean act. original", "mean act. LN-free", "unembed ratio"],
                     [[n["layer"], n["neuron"], n["correlation"], n["mean_original"], n["mean_model"],
                       n["unembed_ratio"]] for n in mech["neurons"]["changed_most"]])]
    for name, p in r["patching"].items():
        models = p["models"]
        parts += ["", f"## Patching: {name} ({p['rows']} clean/corrupt pairs)", "",
                  "Every head's output taken from the corrupt prompt into the clean one; Δ = change of the logit "
                  "difference answer − wrong (nats), effect = Δ / (corrupt − clean).", "",
                  _table(["model", "clean logit diff", "corrupt logit diff", "map correlation with original"],
                         [[LABELS[n], m["clean_logit_diff"], m["corrupt_logit_diff"], p["correlation"].get(n, 1.0)]
                          for n, m in models.items()]),
                  "", "Heads whose effect changed most:", "",
                  _table(["head", "Δ original", "Δ LN-free", "|change|"],
                         [[h["head"], h["delta_original"], h["delta_lnfree"], h["abs_change"]]
                          for h in p["heads_by_change"][:top]])]
    for name, why in r.get("skipped_prompt_sets", {}).items():
        parts += ["", f"Prompt set {name} skipped: {why}"]
    parts += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(parts) + "\n"


# ---- figures ---------------------------------------------------------------------------------------------------
def _heatmap(ax, data, title: str, cmap: str, vmin=None, vmax=None):
    data = np.asarray(data, dtype=float)
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(data.shape[1]))
    ax.set_yticks(range(data.shape[0]))
    plt.colorbar(im, ax=ax, fraction=0.046)


def plot_heads(r: dict, path: Path) -> None:
    """Per-head attention similarity beside each prompt set's patching effects in both models (one colour scale)."""
    sets = list(r["patching"])
    cols = 1 + 2 * len(sets)
    fig, axes = plt.subplots(1, cols, figsize=(4.2 * cols, 3.6), squeeze=False)
    sim = np.asarray(r["mechanism"]["lnfree"]["attention_similarity"], dtype=float)
    _heatmap(axes[0, 0], sim, "attention similarity,\noriginal vs LN-free", "viridis", min(sim.min(), 0.9), 1.0)
    for k, name in enumerate(sets):
        models = r["patching"][name]["models"]
        maps = [np.asarray(models[n]["effect"], dtype=float) for n in ("original", "lnfree")]
        lim = max(float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 0.0 for m in maps) or 1.0
        for j, (n, m) in enumerate(zip(("original", "lnfree"), maps, strict=True)):
            _heatmap(axes[0, 1 + 2 * k + j], m, f"{name}: patching effect,\n{LABELS[n]}", "RdBu_r", -lim, lim)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dla_layers(r: dict, path: Path) -> None:
    mech = r["mechanism"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, m in mech.items():
        layers = [row["layer"] for row in m["dla_per_layer"]]
        ax1.plot(layers, [row["correlation"] for row in m["dla_per_layer"]], "o-", color=COLOURS[name],
                 label=f"original vs {LABELS[name]}")
    _label(ax1, "layer", "correlation of DLA (heads + MLP)", "per-layer DLA agreement")
    rows = mech["lnfree"]["dla_per_layer"]
    x = np.arange(len(rows))
    ax2.bar(x - 0.2, [row["mean_abs_original"] for row in rows], 0.4, color=COLOURS["original"], label="original")
    ax2.bar(x + 0.2, [row["mean_abs_model"] for row in rows], 0.4, color=COLOURS["lnfree"], label="LN-free")
    _label(ax2, "layer", "mean |DLA| (logits)", "size of direct attributions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot_entropy(r: dict, path: Path) -> None:
    out = r["outputs"]
    edges = np.asarray(out["entropy_bin_edges"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, s in out["models"].items():
        counts = np.asarray(s["entropy_hist"], dtype=float)
        ax1.stairs(counts / max(counts.sum(), 1), edges, color=COLOURS[name], lw=1.5,
                   label=f"{LABELS[name]} (mean {s['entropy']:.2f})")
        rel = [b for b in s["reliability"] if b["n"]]
        ax2.plot([b["confidence"] for b in rel], [b["accuracy"] for b in rel], "o-", color=COLOURS[name], ms=3,
                 label=f"{LABELS[name]} (ECE {s['ece']:.3f})")
    _label(ax1, "entropy of the next-token distribution (nats)", "share of predictions", "entropy")
    ax2.plot([0, 1], [0, 1], "k:", lw=0.8)
    _label(ax2, "top-1 confidence", "top-1 accuracy", "reliability (15 bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_neurons(r: dict, path: Path) -> None:
    hists = r["mechanism"]["lnfree"]["neurons"]["correlation_hist"]
    edges = np.linspace(-1, 1, len(hists[0]) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    cmap = plt.get_cmap("viridis")
    for layer, counts in enumerate(hists):
        counts = np.asarray(counts, dtype=float)
        ax.stairs(counts / max(counts.sum(), 1), edges, color=cmap(layer / max(len(hists) - 1, 1)),
                  label=f"layer {layer}")
    first = min(int(np.flatnonzero(np.asarray(c))[0]) for c in hists if np.any(c))
    ax.set_xlim(max(-1.0, edges[first] - 0.1), 1.0)
    ax.set_yscale("log")
    ax.set_xlabel("activation correlation, original vs LN-free (same neuron)")
    ax.set_ylabel("share of the layer's neurons")
    ax.set_title("MLP neurons", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(r: dict[str, Any], out: Path) -> Path:
    """report.md, report.json and the figures in `out`; returns report.md's path."""
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, draw in (("heads.png", plot_heads), ("dla_layers.png", plot_dla_layers), ("entropy.png", plot_entropy),
                       ("neurons.png", plot_neurons)):
        draw(r, out / name)
        figures.append(name)
    (out / "report.json").write_text(json.dumps(r, indent=1))
    (out / "report.md").write_text(markdown(r, figures))
    return out / "report.md"
