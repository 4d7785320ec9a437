"""What an export reads from (`Source`) and what it wrote (`ExportResult`): shared by the pipeline (core) and the
model card (card)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..models.base import LNModel


@dataclass
class Source:
    """A norm-free model and where it came from (for tokenizer files and the model card)."""

    model: LNModel
    name: str  # as given by the user
    model_dir: Path | None  # folder holding config.json and tokenizer files (None for a run checkpoint)
    run_dir: Path | None  # `lnfree remove` run folder (run.json, metrics.jsonl, eval*.json), if any
    folded_here: bool  # True when the source still had (frozen) norm sites and we folded it
    partial: str | None = None  # "step N of M" when exported from an unfinished run's checkpoint (--allow-partial)


@dataclass
class ExportResult:
    path: Path
    format: str
    parity: dict[str, float] = field(default_factory=dict)  # reload route → max-abs logit error (float64: the gate)
    parity_fp32: dict[str, float] = field(default_factory=dict)  # the same in float32 (information)
    gate: float = 0.0  # what the float64 errors had to stay within (`parity_tolerance`)

    @property
    def max_abs(self) -> float:
        return max(self.parity.values())
