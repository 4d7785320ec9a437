"""One run per folder: what `lnfree remove` / `pretrain` may do with their `--out`.

* A new run needs an empty (or absent) folder. A folder holding a run is reused only with `--resume`
  (continue it) or `--overwrite` (clear it and start again); a folder holding anything else is never touched.
* A lock file stops a second process from writing into the same run; a lock left by a dead process is taken over.
  The lock is taken before anything else, so `--overwrite` can never clear a folder another process is writing.
* A new run refused before its first step leaves no run behind (its run.json goes), so the same command works again.
* `--resume` continues exactly what was started: a setting given on the command line that differs from the run's
  own record (run.json) is refused, naming it.
* Temp files a killed checkpoint write left behind are removed when a run (re)starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .config import RESUME_SAFE, flag
from .record import RUN_FILE, RunRecord

# What a run writes into its folder (reporters and `lnfree plot` included); --overwrite clears these and nothing else.
RUN_FILES = {RUN_FILE, "metrics.jsonl", "checkpoints", "final", "loss.png", ".lock", "tensorboard", "wandb",
             "wandb-id", "plots.png"}
LOCK = ".lock"


def is_run_folder(path: Path) -> bool:
    return (path / RUN_FILE).is_file() or (path / "checkpoints").is_dir()


def prepare(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Check `out` for a new run (or a resumed one) and clear it when asked; raises a one-line error otherwise.
    Nothing is deleted unless `overwrite` is given and the folder holds a run."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pick one")
    if resume:
        if not is_run_folder(out):
            raise FileNotFoundError(f"--resume: {out} holds no run (no run.json, no checkpoints/); drop --resume "
                                    "to start one")
        if (out / "final").is_dir():
            raise ValueError(f"--resume: the run in {out} is finished (its model is in {out / 'final'}); nothing is "
                             "left to continue — use final/, or --overwrite to run it again")
        return
    if not out.exists() or not any(p.name != LOCK for p in out.iterdir()):
        return  # empty, or holding only our own lock
    if not is_run_folder(out):
        raise ValueError(f"--out {out} is not empty and holds no lnfree run; give a new or empty folder")
    if not overwrite:
        raise ValueError(f"--out {out} already holds a run; --resume to continue it, --overwrite to clear it and "
                         "start again, or give a new folder")
    # checkpoints first: a kill mid-way must not leave old checkpoints to resume from
    for child in sorted(out.iterdir(), key=lambda p: p.name != "checkpoints"):
        if child.name in RUN_FILES and child.name != LOCK:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold `out/.lock` for the duration: a second process on the same run folder is refused in one line. A
    folder created here and still empty at the end (the run was refused early) is removed again."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                text = lock.read_text().strip()
                pid = int(text or 0)
            except (OSError, ValueError):
                raise ValueError(f"{lock} exists and is not an lnfree lock; give a folder of your own to --out, or "
                                 "move that file away") from None
            if pid and pid != os.getpid() and _alive(pid):
                raise ValueError(f"another lnfree process (pid {pid}) is writing to {out}; wait for it or stop "
                                 "it") from None
            lock.unlink(missing_ok=True)  # left by a process that died: take it over
    else:
        raise ValueError(f"could not take the lock {lock}; remove it if no lnfree process is running")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()  # refused before anything was written: leave no empty folder behind


def discard_unstarted(out: Path) -> None:
    """After a new run failed: when it never finished a step (no checkpoint, no metrics line, no final/), remove
    what it wrote, so the folder is not mistaken for a run that needs --overwrite."""
    out = Path(out)
    checkpoints, metrics = out / "checkpoints", out / "metrics.jsonl"
    if (out / "final").exists() or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return
    if metrics.exists() and metrics.stat().st_size > 0:
        return
    for name in (RUN_FILE, "metrics.jsonl", "checkpoints"):
        path = out / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def remove_stale_temps(out: Path) -> None:
    """Temp folders of checkpoint writes that a kill interrupted (their checkpoint never became visible)."""
    folder = Path(out) / "checkpoints"
    for tmp in folder.glob(".tmp-*") if folder.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def _same_source(a: object, b: object) -> bool:
    """Two ways of naming a model or data source: equal as given, or the same local path."""
    if a == b:
        return True
    pa, pb = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_resume_matches(out: Path, mode: str, model: str, data: str, preset: str | None,
                         overrides: dict[str, object]) -> None:
    """Refuse a `--resume` whose command line changes the run: the mode, model, data, an explicitly given preset
    (resolved name) and every explicitly given training setting must equal what run.json recorded — except the
    settings in `config.RESUME_SAFE` (checkpointing, validation cadence, device)."""
    saved = RunRecord.read(out)
    if saved.mode != mode:
        fix = "add --control" if saved.mode == "control" else "drop --control"
        raise ValueError(f"--resume: {out} is a {saved.mode} run and the command asks for a {mode} run; {fix}")
    for name, recorded_source, given in (("model", saved.model, model), ("data", saved.data, data)):
        if recorded_source is not None and not _same_source(recorded_source, given):
            raise ValueError(f"--resume: {name} {given} differs from the run's {recorded_source} (run.json); resume "
                             "with the same one, or start a new run")
    if preset is not None and saved.preset is not None and preset != saved.preset:
        raise ValueError(f"--resume: --preset {preset} differs from the run's {saved.preset} (run.json); drop it")
    recorded = saved.train.to_dict()
    if saved.sigma is not None:
        recorded["ema_momentum"] = saved.sigma.momentum
    for key, value in overrides.items():
        if key in RESUME_SAFE:
            continue  # where and how often things are written or measured: a resume may change them
        if key in recorded and recorded[key] != value:
            raise ValueError(f"--resume: {flag(key)} {value} differs from the run's {recorded[key]} (run.json); drop "
                             "it to continue the run as it was started, or start a new run")
