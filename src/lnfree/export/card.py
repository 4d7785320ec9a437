"""Model card (`README.md`) for an export: what the model is, how it was made, how well it does, how to load it.

Training facts come only from files of the source's run folder — `run.json` (mode, train settings,
schedule), `metrics.jsonl` (per-step records) and `eval*.json` (evaluation results) — and the card says
"not available" for whatever is missing rather than guessing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..jsonfile import read_jsonl
from ..models import FAMILIES
from ..run.record import read_record
from .result import ExportResult, Source


def _format_text(fmt: str, hf_class: str, compat_class: str) -> str:
    if fmt == "hf":
        return (f"`hf` — `{hf_class}`: the model with no normalization modules at all and an untied `lm_head` with "
                "a bias. transformers loads it after `import lnfree` (no remote code).")
    return (f"`hf-compat` — a stock `{compat_class}` in the published LN-free convention: every norm has eps = 1e12 "
            "and weight 1e6 (the final norm: 1e6·γ/σ̂ and β), so each is a fixed centring. Loads with zero extra "
            "code; use it in fp32 or bf16 (fp16 overflows the 1e6 weights).")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_record(run_dir: Path) -> dict | None:
    """The run record as the card shows it (the run.json object); a damaged one leaves the card without it."""
    try:
        record = read_record(run_dir)
    except (OSError, ValueError):
        return None
    return record.to_dict() if record else None


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        return [row for k, v in d.items() for row in _flatten(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), d)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text if len(text) <= 80 else text[:77] + "…"


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("setting", "value")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def _training_section(run_dir: Path | None) -> str:
    run = _run_record(run_dir) if run_dir else None
    metrics_path = run_dir / "metrics.jsonl" if run_dir else None
    parts = ["## Training"]
    if not run and not (metrics_path and metrics_path.is_file()):
        return "## Training\n\nNot available: no `run.json` or `metrics.jsonl` beside the source model."
    if run:
        parts.append(f"Mode: `{run.get('mode', 'unknown')}`.")
        if isinstance(run.get("train"), dict):
            parts += ["### Training settings", _table(_flatten(run["train"]))]
        if isinstance(run.get("schedule"), dict):
            parts += ["### LayerNorm-removal schedule", _table(_flatten(run["schedule"]))]
        extra = {k: v for k, v in run.items() if k not in ("mode", "train", "schedule")}
        if extra:
            parts += ["### Other run facts", _table(_flatten(extra))]
    if metrics_path and metrics_path.is_file():
        records = read_jsonl(metrics_path)
        if records:
            last = records[-1]
            events = sum(len(r.get("events", [])) for r in records)
            rows = [("steps logged", len(records)), ("final step", last.get("step")),
                    ("final loss", last.get("loss")), ("tokens", last.get("tokens")),
                    ("frozen sites at end", f"{last.get('frozen_sites')}/{last.get('n_sites')}"),
                    ("site-freeze events", events)]
            parts += ["### Run summary (metrics.jsonl)", _table([r for r in rows if r[1] is not None], ("", ""))]
    return "\n\n".join(parts)


def _eval_section(run_dir: Path | None) -> str:
    files = sorted(run_dir.glob("eval*.json")) if run_dir else []
    tables = []
    for path in files:
        data = _read_json(path)
        if data is not None:
            tables += [f"### {path.name}", _table(_flatten(data), ("metric", "value"))]
    if not tables:
        return "## Evaluation\n\nNot available: no `eval*.json` beside the source model."
    return "\n\n".join(["## Evaluation", *tables])


def _loading_section(fmt: str, hf_class: str) -> str:
    hf_load = (f"import lnfree  # registers {hf_class} with transformers\n" if fmt == "hf" else "")
    return f"""## Loading

transformers:
```python
{hf_load}from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("MODEL_DIR")
tokenizer = AutoTokenizer.from_pretrained("MODEL_DIR")
```

TransformerLens (4.x `TransformerBridge`; norm hooks are identities, `decompose_resid` sums exactly):
```python
from lnfree.interop import to_transformer_lens
bridge = to_transformer_lens("MODEL_DIR")
logits, cache = bridge.run_with_cache("Hello world")
```

nnsight:
```python
from lnfree.interop import to_nnsight
model = to_nnsight("MODEL_DIR")
with model.trace("Hello world"):
    resid = model.transformer.h[3].output.save()
```

Check it: `lnfree verify MODEL_DIR` (no live normalization, exact direct logit attribution, export parity)."""


def render_card(src: Source, result: ExportResult) -> str:
    parity = ", ".join(f"{k} {v:.1e}" for k, v in result.parity.items())
    parity += "; in float32: " + ", ".join(f"{k} {v:.1e}" for k, v in result.parity_fp32.items())
    arch = src.model.architecture_rows()
    family = FAMILIES[src.model.family]
    classes = family.hf().classes(src.model)[:2]
    display = dict(arch).get("family", family.name)
    return "\n\n".join([
        f"---\nlibrary_name: transformers\ntags:\n- lnfree\n- layernorm-free\n- {family.name}\n---",
        f"# LayerNorm-free {display}",
        f"Exported by `lnfree export` from `{src.name}`"
        + (" (frozen norm sites folded into the weights)." if src.folded_here else ".")
        + (f" **Partial:** taken from an unfinished run's checkpoint at {src.partial}." if src.partial else ""),
        "The model has no normalization: the residual stream is read by linear maps only, so direct logit "
        "attribution is exact (logits = Σ components · W_U + b_U).",
        f"Format: {_format_text(result.format, *classes)}",
        f"Reload parity (max-abs logits vs the source, evaluated in float64 from the stored weights): {parity}.",
        "## Architecture\n\n" + _table(arch),
        _training_section(src.run_dir),
        _eval_section(src.run_dir),
        _loading_section(result.format, classes[0]),
    ]) + "\n"


def write_card(folder: Path, src: Source, result: ExportResult) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(render_card(src, result))
    return path
