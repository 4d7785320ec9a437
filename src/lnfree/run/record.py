"""The run record: what one run folder's run.json says, written and read here and nowhere else.

A run (removal, vanilla control or pretraining) records its mode, its training settings, its schedule, its σ̂ rule
(removal runs only) and where its model and data came from. The file stays the flat JSON object it has always been
(`mode`, `train`, `schedule`, `sigma`, and the source's keys beside them), so older run folders keep loading;
readers get typed fields instead of parsing the dict by hand.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..jsonfile import atomic_write, read_json
from ..method.schedule import Schedule
from ..method.sigma import SigmaRule
from .config import TrainConfig

RUN_FILE = "run.json"
MODES = ("lnfree", "control", "pretrain")


@dataclass(frozen=True)
class RunSource:
    """Where a run's model and tokens came from (empty for a bare `train()` call from Python)."""

    data: str | None = None
    tokenizer_fingerprint: str | None = None
    data_manifest: dict | None = None
    model: str | None = None  # None for pretraining: the model was built, not loaded
    preset: str | None = None
    data_window_sequences: int | None = None  # a sampled cache is read in its first this-many sequences
    eval_data: str | None = None  # the validation source, when the run validates
    model_gguf: dict | None = None  # a GGUF source's file name and hash

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


_SOURCE_KEYS = {f.name for f in fields(RunSource)}


@dataclass(frozen=True)
class RunRecord:
    mode: str
    train: TrainConfig
    schedule: Schedule
    source: RunSource = RunSource()
    sigma: SigmaRule | None = None  # removal runs only

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"run mode {self.mode!r}; one of {', '.join(MODES)}")

    @property
    def model(self) -> str | None:
        return self.source.model

    @property
    def data(self) -> str | None:
        return self.source.data

    @property
    def preset(self) -> str | None:
        return self.source.preset

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"mode": self.mode, "train": self.train.to_dict(), "schedule": self.schedule.to_dict()}
        out.update(self.source.to_dict())
        if self.sigma is not None:
            out["sigma"] = self.sigma.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = RUN_FILE) -> RunRecord:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: not an lnfree run record (expected a JSON object)")
        missing = [k for k in ("mode", "train", "schedule") if k not in d]
        if missing:
            raise ValueError(f"{where}: not an lnfree run record (no {', '.join(missing)}); restore the file or "
                             "start from a fresh folder")
        try:
            source = RunSource(**{k: v for k, v in d.items() if k in _SOURCE_KEYS})
            return cls(mode=d["mode"], train=TrainConfig.from_dict(d["train"]),
                       schedule=Schedule.from_dict(d["schedule"]), source=source,
                       sigma=SigmaRule.from_dict(d["sigma"]) if d.get("sigma") is not None else None)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{where}: damaged run record ({e}); restore the file or start from a fresh folder"
                             ) from None

    def write(self, run_dir: str | Path) -> None:
        atomic_write(Path(run_dir) / RUN_FILE, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        path = Path(run_dir) / RUN_FILE
        return cls.from_dict(read_json(path), str(path))


def read_record(run_dir: str | Path) -> RunRecord | None:
    """The folder's run record, or None when it has none."""
    return RunRecord.read(run_dir) if (Path(run_dir) / RUN_FILE).is_file() else None
