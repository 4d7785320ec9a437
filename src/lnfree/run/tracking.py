"""Where a run's numbers go besides metrics.jsonl (always written, the source of truth): TensorBoard, Weights &
Biases, and the progress display — a bar on a terminal, plain lines under nohup / SLURM / CI.

Reporters receive each step's metrics record flattened to scalars: loss, aux_loss, lr, grad_norm, tokens_per_s,
peak_mem_gib (`PeakMemory`), frozen_sites, val_loss (when measured) and σ̂ of every site as `sigma/<site>` (a
per-head site as `sigma/<site>/h<k>`). A resumed run purges what a reporter holds beyond its checkpoint, as
metrics.jsonl does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tqdm.auto import tqdm

if TYPE_CHECKING:  # torch only when a run starts: the command line's help imports this module
    import torch

REPORTERS = ("none", "tensorboard", "wandb")


class Reporter(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class PeakMemory:
    """The run's peak memory so far, in GiB, counted from its start: on CUDA the most the caching allocator held
    for tensors; on CPU the process's peak resident set (weights, optimizer state, activations, data and the
    interpreter together), its high-water mark reset at the start where Linux allows (/proc/self/clear_refs),
    else the process's peak since it began."""

    def __init__(self, device: torch.device):
        import torch

        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
            except OSError:
                pass

    def gib(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        try:
            status = Path("/proc/self/status").read_text()
            return int(status.split("VmHWM:")[1].split()[0]) / 2**20  # kB
        except (OSError, IndexError, ValueError):
            import resource  # no /proc: the peak since the process started (kB on Linux, bytes on macOS)

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak / (2**30 if sys.platform == "darwin" else 2**20)


def scalars(record: dict) -> dict[str, float]:
    """One metrics.jsonl record as name -> number (σ̂ per site flattened; events and counters dropped)."""
    out = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    for site, value in record.get("sigma", {}).items():
        if isinstance(value, list):
            out.update({f"sigma/{site}/h{h}": float(v) for h, v in enumerate(value)})
        else:
            out[f"sigma/{site}"] = float(value)
    return out


class TensorBoardReporter:
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN`)."""

    def __init__(self, run_dir: Path, start_step: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after the checkpoint this resume starts from
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step or None)
        if not start_step:
            self.writer.add_text("run.json", f"```\n{json.dumps(config, indent=1)}\n```")

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A W&B run named after the folder, resumed with it (its id kept in RUN/wandb-id). Offline unless
    WANDB_API_KEY or WANDB_MODE says otherwise, so it works without a network (`wandb sync RUN/wandb/...`)."""

    def __init__(self, run_dir: Path, start_step: int, config: dict):
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / "wandb-id"
        run_id = id_file.read_text().strip() if start_step and id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lnfree"), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config, mode=mode)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def check_reporters(names: tuple[str, ...] | list[str]) -> None:
    """Refuse, before a run writes anything, a reporter that is unknown or whose package is missing."""
    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"unknown --report-to {name!r}; choose from {', '.join(REPORTERS)}")
        if name != "none" and importlib.util.find_spec(name) is None:  # each reporter is its package's name
            raise ValueError(f"--report-to {name} needs the {name} package: pip install {name} (or "
                             "pip install 'lnfree[track]')")


def open_reporters(names: tuple[str, ...] | list[str], run_dir: Path, start_step: int,
                   config: dict) -> list[Reporter]:
    check_reporters(names)
    kinds = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}
    return [kinds[n](run_dir, start_step, config) for n in dict.fromkeys(names) if n != "none"]


class StepProgress:
    """A tqdm bar when stderr is a terminal; otherwise one plain line every ~2% of the run (and at least once a
    minute, and at the last step), which reads well in nohup.out or a SLURM log."""

    def __init__(self, start: int, total: int, desc: str, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.start, self.total, self.desc, self.enabled = start, total, desc, enabled
        self.tty = enabled and self.stream.isatty()
        self.bar = tqdm(initial=start, total=total, desc=desc, unit="step", dynamic_ncols=True,
                        file=self.stream) if self.tty else None
        self.every = max(1, total // 50)
        self.t0 = self.last_line = time.time()

    def update(self, step: int, fields: dict[str, str]) -> None:
        """After `step` finished; `fields` are display strings (loss, lr, …)."""
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)
            return
        now = time.time()
        done = step + 1
        if not self.enabled or not (done % self.every == 0 or done == self.total or now - self.last_line > 60):
            return
        self.last_line = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k} {v}" for k, v in fields.items())
        print(f"{self.desc}: step {done}/{self.total} {shown} elapsed {now - self.t0:.0f}s eta {eta:.0f}s",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
