"""Run checkpoints: atomic, safe to load, and complete enough that a resumed run repeats the same losses.

Layout of one checkpoint, `RUN/checkpoints/step_00000050/`:
    model.safetensors      the model's own state dict, σ̂ buffers and site states included
    optimizer.safetensors  AdamW moments and step counts, keyed "<param index>.<name>"
    rng.safetensors        torch (and CUDA) generator states
    state.json             step, train config, schedule, data cursor, model config, loss history
Nothing is unpickled on load. A checkpoint is written into a hidden temp folder and renamed into place, so a
kill at any moment leaves either the old set or the old set plus one complete new checkpoint; only then are
checkpoints beyond the newest `keep` removed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .models.base import LNModel
from .models.io import FAMILIES

_PREFIX = "step_"


@dataclass
class RunState:
    """What a checkpoint holds besides tensors; plain JSON."""

    step: int  # the next optimizer step to run
    train: dict
    schedule: dict
    data: dict  # the sampler's cursor
    model_config: dict  # transformers-style config.json of the model
    family: str
    history: list  # recent per-step losses (the spike guard's window)
    extra: dict


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (state.json written last), oldest first."""
    folder = checkpoint_dir(run_dir)
    found = sorted(folder.glob(f"{_PREFIX}*")) if folder.is_dir() else []
    return [p for p in found if (p / "state.json").is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def load_latest_readable(run_dir: Path, model: LNModel, optimizer: torch.optim.Optimizer) -> tuple[Path, RunState]:
    """Restore the newest checkpoint that reads back whole; an unreadable one (a truncated file, a disk error)
    is skipped with a warning, so a corrupt newest checkpoint falls back to the one before."""
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_dir(run_dir)}; drop --resume to start")
    for path in reversed(found):
        try:
            _, state = load_checkpoint(path, model, optimizer)
            return path, state
        except Exception as e:  # noqa: BLE001 - safetensors, json and shape errors all mean "unreadable"
            print(f"lnfree: warning: checkpoint {path} is unreadable ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); trying the one before", file=sys.stderr)
    raise ValueError(f"--resume: no readable checkpoint in {checkpoint_dir(run_dir)}; start the run again with "
                     "--overwrite")


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors = {f"{idx}.{name}": value.detach().cpu().contiguous() for idx, state in sd["state"].items()
               for name, value in state.items() if torch.is_tensor(value)}
    return tensors, {"param_groups": sd["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def save_checkpoint(run_dir: Path, model: LNModel, optimizer: torch.optim.Optimizer, state: RunState,
                    keep: int = 2) -> Path:
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{_PREFIX}{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  tmp / "model.safetensors")
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(_rng_tensors(), tmp / "rng.safetensors")
        payload = {**state.__dict__, "optimizer": opt_meta}
        (tmp / "state.json").write_text(json.dumps(payload, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OSError(f"could not write checkpoint {target} ({e.strerror or e}); "
                          "the previous checkpoint is intact — free disk space or fix permissions") from None
        raise
    for old in sorted(folder.glob(f"{_PREFIX}*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model: LNModel | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> tuple[LNModel, RunState]:
    """Restore weights (building the model from its config if none is given), optimizer and RNG state."""
    path = Path(path)
    payload = json.loads((path / "state.json").read_text())
    opt_meta = payload.pop("optimizer")
    state = RunState(**payload)
    if model is None:
        model = FAMILIES[state.family].build(state.model_config)
    model.load_state_dict(load_file(path / "model.safetensors"))
    if optimizer is not None:
        tensors = load_file(path / "optimizer.safetensors")
        per_param: dict[int, dict] = {}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            per_param.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": opt_meta["param_groups"]})
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return model, state
