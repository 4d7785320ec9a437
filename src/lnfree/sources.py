"""Model sources: the one place a model named on the command line (or in Python) is found — a checkpoint folder, a
run folder (its final/, or while unfinished its newest checkpoint), a GGUF file or named GGUF source dequantized
once into a cached folder, or a hub id fetched into the local hub cache — and loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import gguf
from .models.base import LNModel
from .models.io import TOKENIZER_FILES, load_model
from .run.checkpoint import latest_checkpoint, load_checkpoint
from .run.lora import add_adapters, has_adapters, merge_adapters
from .run.record import read_record


@dataclass(frozen=True)
class ModelSource:
    """Where a model named on the command line lives. Exactly one of `model_dir` (a transformers checkpoint
    folder) and `checkpoint` (the newest checkpoint of a run that has no final/ yet) is set."""

    name: str
    model_dir: Path | None
    run_dir: Path | None  # the `lnfree remove` / `pretrain` run folder it belongs to, if any
    checkpoint: Path | None = None
    gguf: dict | None = None  # a GGUF source: its file name, sha256 and size (model_dir is its dequantized folder)


def resolve_source(source: str | os.PathLike, *, unfinished_runs: bool = False) -> ModelSource:
    """The one model-source resolver: a checkpoint folder, a run folder (its final/; with `unfinished_runs`,
    its newest checkpoint when there is no final/ yet), a GGUF file (or a folder holding one, or a named GGUF source
    such as `smollm2-135m`) dequantized once into a cached folder, or a hub id fetched into the local hub cache."""
    if str(source) in gguf.NAMED_SOURCES:
        source_file = gguf.named_gguf(str(source))
    else:
        source_file = gguf.gguf_file_in(Path(source).expanduser())
    if source_file is not None:
        made = gguf.dequantized(source_file)
        return ModelSource(str(source), made.model_dir, None, gguf=made.record())
    path = Path(source).expanduser()
    if (path / "final" / "config.json").is_file():
        return ModelSource(str(source), path / "final", path)
    if path.exists():
        if (path / "config.json").is_file():
            return ModelSource(str(source), path, _run_dir_of(path))
        if (path / "checkpoints").is_dir():
            ckpt = latest_checkpoint(path)
            if not unfinished_runs:
                raise ValueError(f"{path} is a run folder without final/ (unfinished run); give a finished run")
            if ckpt is not None:
                return ModelSource(str(source), None, path, ckpt)
        raise FileNotFoundError(f"{path} has no config.json, no final/ model and no run checkpoint; point at a "
                                "transformers checkpoint folder or an `lnfree remove` run folder")
    if str(source).count("/") > 1 or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such model folder: {source}")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model.bin",
                    "generation_config.json", *TOKENIZER_FILES]
        return ModelSource(str(source), Path(snapshot_download(str(source), allow_patterns=patterns)), None)
    except Exception as e:  # offline, unknown repo, gated …
        raise FileNotFoundError(f"cannot fetch model {source!r} from the hub ({type(e).__name__}); "
                                "give a local checkpoint folder instead") from None


def resolve_model_dir(source: str | os.PathLike) -> Path:
    """The transformers checkpoint folder of a source (a finished run's final/, a folder, a hub id)."""
    return resolve_source(source).model_dir


def _run_dir_of(folder: Path) -> Path | None:
    for cand in (folder, folder.parent):
        if any((cand / n).is_file() for n in ("run.json", "metrics.jsonl")) or any(cand.glob("eval*.json")):
            return cand
    return None


def _adapted_base(checkpoint: Path, dtype: torch.dtype | None) -> LNModel | None:
    """For a checkpoint of a LoRA run (which leaves out the frozen base weights): the base model from the run's
    own source, with the run's adapters in place for the checkpoint to fill; None for any other checkpoint."""
    record = read_record(checkpoint.parent.parent)
    t = record.train if record is not None else None
    if t is None or not t.lora_rank:
        return None
    model, _ = load_source(record.model, dtype=dtype)
    add_adapters(model, t.lora_rank, t.lora_alpha, t.lora_targets, t.lora_trainable, t.seed)
    return model


def load_source(source: str | os.PathLike, *, unfinished_runs: bool = False,
                dtype: torch.dtype | None = None) -> tuple[LNModel, ModelSource]:
    """(model as stored — live, frozen or folded —, where it came from) for any source `resolve_source` reads."""
    where = resolve_source(source, unfinished_runs=unfinished_runs)
    if where.checkpoint is not None:
        with torch.random.fork_rng(devices=[]):  # loading a run checkpoint restores RNG state; keep ours
            model, _ = load_checkpoint(where.checkpoint, _adapted_base(where.checkpoint, dtype))
        if has_adapters(model):
            merge_adapters(model)
        model.source = str(source)
        return (model.to(dtype) if dtype is not None else model), where
    return load_model(where.model_dir, dtype=dtype), where
