"""Run checkpoints: atomic, safe to load, and complete enough that a resumed run repeats the same losses — at any
world size.

Layout of one checkpoint, `RUN/checkpoints/step_00000050/`, in one of two forms:
    model.safetensors      the whole model's state dict (σ̂ buffers and site states included)   one process, DDP
    optimizer.safetensors  the whole AdamW state, keyed "<parameter name>.<moment>"              (rank 0 writes)
  or
    dcp/                   model and optimizer as `torch.distributed.checkpoint` shards           FSDP2 (every rank)
and in both
    state.json             step, data cursor, model config, loss history (settings and schedule: run.json)
A LoRA run's checkpoint leaves out the frozen base weights (run/lora.py): the model holds the adapters, the
parameters that train and the σ̂ buffers; a resume rebuilds the base from the run's model source first.
Parameters are named by their fully qualified names (`torch.distributed.checkpoint.state_dict`), so either form
loads into a plain, a DDP or an FSDP2 model at any world size. No generator state is kept: dropout masks are
seeded per micro-batch (lnfree.distributed.micro_seed). Nothing is unpickled on load. A checkpoint is written
into a hidden temp folder and renamed into place, so a kill at any moment leaves either the old set or the old
set plus one complete new checkpoint; only then are checkpoints beyond the newest `keep` removed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..distributed import SINGLE, World
from ..jsonfile import read_json
from ..models.base import LNModel
from ..models.families import FAMILIES
from .lora import frozen_parameter_names, has_adapters, merge_adapters, merged_state_dict

_PREFIX = "step_"


@dataclass
class RunState:
    """What a checkpoint holds besides tensors; plain JSON."""

    step: int  # the next optimizer step to run
    data: dict  # the sampler's cursor
    model_config: dict  # transformers-style config.json of the model
    family: str
    history: list  # recent per-step losses (the spike guard's window)


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


def load_latest_readable(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                         world: World = SINGLE) -> tuple[Path, RunState]:
    """Restore the newest checkpoint that reads back whole; an unreadable one (a truncated file, a disk error)
    is skipped with a warning, so a corrupt newest checkpoint falls back to the one before. The ranks of a
    distributed run agree on the checkpoint they take."""
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_dir(run_dir)} (the run stopped before its "
                                "first); start it again with --overwrite instead of --resume")
    for path in reversed(found):
        try:
            state = restore(path, model, optimizer, world)
            ok = True
        except Exception as e:  # noqa: BLE001 - safetensors, json and shape errors all mean "unreadable"
            ok = False
            if world.is_main:
                print(f"lnfree: warning: checkpoint {path} is unreadable ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); trying the one before", file=sys.stderr)
        if world.all_true(ok):
            return path, state
    raise ValueError(f"--resume: no readable checkpoint in {checkpoint_dir(run_dir)}; start the run again with "
                     "--overwrite")


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: RunState,
                    keep: int = 2, world: World = SINGLE) -> Path:
    """Write one checkpoint (a collective call in a distributed run: every rank calls it)."""
    folder = checkpoint_dir(run_dir)
    target = folder / f"{_PREFIX}{state.step:08d}"
    sharded = world.fsdp and world.active
    if not (sharded or world.is_main):
        return target  # DDP: the replicas are equal, rank 0 writes the whole state
    tmp = None
    try:
        if world.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
        if sharded:
            tmp = Path(world.broadcast(str(tmp)))
            dcp.save({"model": _trained(model, get_model_state_dict(model)),
                      "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp / "dcp")
            world.barrier()
            if not world.is_main:
                return target
        else:
            weights = _trained(model, get_model_state_dict(model, options=_FULL))
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
            osd = get_optimizer_state_dict(model, optimizer, options=_FULL)
            save_file({f"{name}.{key}": v.contiguous() for name, st in osd["state"].items()
                       for key, v in st.items()}, tmp / "optimizer.safetensors")
        payload = {**state.__dict__, "optimizer": {"param_groups": _param_groups(model, optimizer)}}
        (tmp / "state.json").write_text(json.dumps(payload, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None and world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OSError(f"could not write checkpoint {target} ({e.strerror or e}); "
                          "the previous checkpoint is intact — free disk space or fix permissions") from None
        raise
    for old in sorted(folder.glob(f"{_PREFIX}*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _trained(model: nn.Module, state: dict) -> dict:
    """The state a checkpoint keeps: all of it, less the base weights a LoRA run never changes."""
    frozen = frozen_parameter_names(model)
    return {k: v for k, v in state.items() if k not in frozen} if frozen else state


def _check_keys(model: nn.Module, saved: set[str], path: Path) -> None:
    """A checkpoint may lack only the frozen base weights of a LoRA run; anything else missing or extra means it
    belongs to another model (a LoRA checkpoint loaded without its adapters, or the reverse)."""
    expected = set(model.state_dict())
    missing, extra = expected - saved - frozen_parameter_names(model), saved - expected
    if missing or extra:
        what = f"lacks {sorted(missing)[0]}" if missing else f"holds {sorted(extra)[0]}, which the model has not"
        raise ValueError(f"checkpoint {path} {what} ({len(missing)} missing, {len(extra)} unexpected): it was "
                         "written by another model or another --lora setting")


def _param_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's hyper-parameters per group, parameters by name (what `set_optimizer_state_dict` reads)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups]


def restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            world: World = SINGLE) -> RunState:
    """Load a checkpoint's weights (and optimizer state) into `model` — plain, DDP or FSDP2 — whatever world size
    wrote it; returns its RunState."""
    path = Path(path)
    payload = read_json(path / "state.json")
    groups = payload.pop("optimizer")["param_groups"]
    state = RunState(**{k: v for k, v in payload.items() if k in RunState.__dataclass_fields__})
    if (path / "dcp").is_dir():
        sd = {"model": _trained(model, get_model_state_dict(model))}
        if optimizer is not None:
            sd["optim"] = get_optimizer_state_dict(model, optimizer)
        with warnings.catch_warnings():  # one process reading shards: DCP says it assumes so; it is so
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(sd, checkpoint_id=path / "dcp", no_dist=not world.active)
        set_model_state_dict(model, sd["model"], options=StateDictOptions(strict=not has_adapters(model)))
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, sd["optim"])
        return state
    full = StateDictOptions(full_state_dict=True, strict=not has_adapters(model))
    weights = load_file(path / "model.safetensors")
    _check_keys(model, set(weights), path)
    set_model_state_dict(model, weights, options=full)
    if optimizer is not None:
        per_param: dict[str, dict] = {}
        for key, value in load_file(path / "optimizer.safetensors").items():
            name, moment = key.rsplit(".", 1)
            per_param.setdefault(name, {})[moment] = value
        set_optimizer_state_dict(model, optimizer, {"state": per_param, "param_groups": groups}, options=full)
    return state


def load_checkpoint(path: Path, model: LNModel | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> tuple[LNModel, RunState]:
    """Restore weights (building the model from its config if none is given) and optimizer state, in one
    process."""
    path = Path(path)
    if model is None:
        payload = read_json(path / "state.json")
        model = FAMILIES[payload["family"]].build(payload["model_config"])
    return model, restore(path, model, optimizer)


def whole_model(model: LNModel, world: World = SINGLE) -> LNModel | None:
    """The trained model as one ordinary module on rank 0 — gathered from the shards under FSDP2 (every rank
    calls this), LoRA adapters merged into their weights —; None on the other ranks."""
    if not (world.fsdp and world.active):
        return (merge_adapters(model) if has_adapters(model) else model) if world.is_main else None
    sd = get_model_state_dict(model, options=_FULL)
    if not world.is_main:
        return None
    family = FAMILIES[model.family]
    whole = family.build(family.config_dict(model))
    whole.load_state_dict(merged_state_dict(model, sd) if has_adapters(model) else sd)
    return whole
