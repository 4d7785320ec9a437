"""Evaluation results as tables: one row per (dataset or benchmark, metric), Δ against a baseline model,
Markdown for people and JSON for programs (`lnfree eval --markdown / --json`)."""

from __future__ import annotations

import math
from typing import Any


def model_names(results: dict[str, Any]) -> list[str]:
    names = list(results.get("models", {}))
    for table in (results.get("ce", {}), results.get("benchmarks", {})):
        for row in table.values():
            names += [n for n in row if n not in names]
    return names


def table_rows(results: dict[str, Any], baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per (dataset, CE) and (task, metric): values per model and Δ against `baseline`.

    The same rows feed the JSON ("table") and the Markdown, so both always agree.
    """
    names = model_names(results)
    if baseline is not None and baseline not in names:
        raise ValueError(f"--baseline {baseline!r} is not one of the models: {', '.join(names)}")
    rows = []
    for dname, per_model in results.get("ce", {}).items():
        rows.append({"kind": "ce", "name": dname, "metric": "ce",
                     "values": {m: s["mean"] for m, s in per_model.items()}})
    for task, per_model in results.get("benchmarks", {}).items():
        metrics = [k for k in ("acc_norm", "acc", "perplexity") if any(k in r for r in per_model.values())]
        for metric in metrics:
            rows.append({"kind": "benchmark", "name": task, "metric": metric,
                         "values": {m: r.get(metric) for m, r in per_model.items()},
                         "stderr": {m: r.get(f"{metric}_stderr") for m, r in per_model.items()}})
    for row in rows:
        base = row["values"].get(baseline) if baseline is not None else None
        row["delta"] = {m: (v - base if v is not None and base is not None else None)
                        for m, v in row["values"].items()} if base is not None else {}
    return rows


def with_table(results: dict[str, Any], baseline: str | None = None) -> dict[str, Any]:
    """The results plus the comparison table (values and Δ), ready for json.dump."""
    return {**results, "baseline": baseline, "table": table_rows(results, baseline)}


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value) or abs(value) >= 1e4:
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def _cell(row: dict[str, Any], model: str, baseline: str | None) -> str:
    value = row["values"].get(model)
    scale = 100.0 if row["kind"] == "benchmark" and row["metric"] != "perplexity" else 1.0
    digits = 2 if scale == 100.0 else 4
    text = _fmt(None if value is None else value * scale, digits)
    stderr = row.get("stderr", {}).get(model)
    if value is not None and stderr is not None:
        text += f" ± {stderr * scale:.{digits}f}"
    delta = row["delta"].get(model)
    if delta is not None and model != baseline:
        text += f" ({delta * scale:+.{digits}f})"
    return text


def format_markdown(results: dict[str, Any], baseline: str | None = None) -> str:
    """Comparison table (CE in nats, benchmarks in %, Δ vs `baseline` in parentheses), loss distribution,
    and the worst sequences of each model on each dataset."""
    names = model_names(results)
    rows = table_rows(results, baseline)
    p = results.get("protocol", {})
    out = ["## Comparison" + (f" (Δ vs {baseline})" if baseline else ""), "",
           f"CE: mean per-token loss in nats, ctx {p.get('ctx')}, {p.get('dtype')}, no BOS, EOT targets included."
           " Benchmarks: lm-evaluation-harness, % ± standard error.", "",
           "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        label = f"{row['name']} CE" if row["kind"] == "ce" else f"{row['name']} {row['metric']}"
        out.append(f"| {label} | " + " | ".join(_cell(row, m, baseline) for m in names) + " |")
    out += _distribution_lines(results)
    return "\n".join(out) + "\n"


def _distribution_lines(results: dict[str, Any]) -> list[str]:
    ce = results.get("ce", {})
    if not ce:
        return []
    has_kl = any(s.get("kl") is not None for per in ce.values() for s in per.values())
    head = "| dataset | model | mean | median | p95 | p99.9 | max | tokens |" + (" KL(ref‖model) |" if has_kl else "")
    lines = ["", "## Per-token loss distribution", "", head, "|---" * (8 + has_kl) + "|"]
    worst = ["", "## Highest-loss sequences (index: mean loss)", "", "| dataset | model | sequences |", "|---|---|---|"]
    for dname, per_model in ce.items():
        for mname, s in per_model.items():
            cells = [dname, mname, *(_fmt(s[k]) for k in ("mean", "median", "p95", "p999", "max")),
                     f"{s['n_tokens']:,}"] + ([_fmt(s.get("kl"))] if has_kl else [])
            lines.append("| " + " | ".join(cells) + " |")
            seqs = ", ".join(f"{t['index']}: {_fmt(t['loss'])}" for t in s["top_sequences"])
            worst.append(f"| {dname} | {mname} | {seqs} |")
    return lines + worst


# ---- the `lnfree eval` pipeline ----------------------------------------------------------------------------
