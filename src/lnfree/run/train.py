"""The training loop: LN removal fine-tuning, its vanilla control, and pretraining — one loop.

Short on purpose: the optimizer step itself (step.py: `Stepper`, the lr schedule, AdamW, the loss), schedules
(method/schedule.py), σ̂ (method/calibrate.py), data (lnfree.data), checkpoints (checkpoint.py) and plots
(analysis/plots.py) live elsewhere. Per optimizer step:
    1. put every site in the schedule's state for this step (σ̂ freezes at the switch)
    2. gradient accumulation over micro-batches; CE over every next-token prediction, EOT targets included
       (the 2025 code masked them out); Baroni's auxiliary loss when its weight > 0
    3. clip, AdamW step, then one EMA update of σ̂ at live sites from this step's training forwards
    4. spike guard, metrics line (σ̂ of every site, validation CE every `eval_every` steps; also sent to TensorBoard /
       W&B when asked), checkpoint
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..jsonfile import atomic_write, read_jsonl
from ..method.calibrate import calibrate
from ..method.schedule import Schedule
from ..method.sigma import SigmaRule
from ..models import FAMILIES
from ..models.base import LNModel
from .checkpoint import RunState, load_latest_readable, save_checkpoint, whole_model
from .config import TrainConfig, check_settings
from .lora import add_adapters
from .record import RunRecord, RunSource
from .step import Stepper, autocast, native_bf16_cpu, uses_bf16
from .tracking import PeakMemory, StepProgress, check_reporters, open_reporters, scalars


class Sampler(Protocol):
    def next_indices(self, n: int) -> np.ndarray: ...  # the next n sequences (advances the cursor)
    def gather(self, indices: np.ndarray) -> Tensor: ...  # (len(indices), ctx) token ids
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class TrainingDiverged(RuntimeError):
    """Loss went non-finite or spiked; the last good checkpoint is kept."""


@dataclass
class RunResult:
    steps_run: int
    final_loss: float
    tokens: int
    wall_seconds: float
    model: LNModel | None  # the trained model as one ordinary module (LoRA merged); None on ranks other than 0


def validation_loss(model: LNModel, batches: list[Tensor], cfg: TrainConfig, device: torch.device) -> float:
    """Mean next-token CE over `batches` — `lnfree eval`'s own computation, in eval mode: no dropout, and σ̂
    neither measured nor moved, so validating never changes the run."""
    from ..analysis.evaluate import evaluate_ce

    dtype = "bf16" if uses_bf16(cfg, device) else "fp32"
    return evaluate_ce(model, batches, dtype=dtype, progress=False).mean


def sigma_record(model: LNModel) -> dict[str, float | list[float]]:
    """σ̂ of every site (a per-head site: one per head), as metrics.jsonl stores it; one device transfer."""
    sites = model.norm_sites()
    values = torch.cat([site.sigma.detach().reshape(-1).float() for site in sites.values()]).tolist()
    out, i = {}, 0
    for name, site in sites.items():
        n = site.sigma.numel()
        out[name] = values[i] if site.sigma.dim() == 0 else values[i : i + n]
        i += n
    return out


class _Batches:
    """Each step's rows of this rank on the device; the next step's read — and, on CUDA, copied through pinned
    memory without blocking — while the device computes this one. A checkpoint saves the cursor as it was before
    that read ahead, so a resume sees the batches an uninterrupted run would."""

    def __init__(self, sampler: Sampler, seqs_per_step: int, rows: np.ndarray, device: torch.device):
        self.sampler, self.n, self.rows, self.device = sampler, seqs_per_step, rows, device
        self.ahead: Tensor | None = None
        self.cursor = sampler.state_dict()

    def _read(self) -> Tensor:
        batch = self.sampler.gather(self.sampler.next_indices(self.n)[self.rows])
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def take(self) -> Tensor:
        batch = self.ahead if self.ahead is not None else self._read()
        self.ahead = None
        self.cursor = self.sampler.state_dict()
        return batch

    def read_ahead(self) -> None:
        self.ahead = self._read()

    def state_dict(self) -> dict:
        """The cursor after the batches taken so far (not the one read ahead)."""
        return self.cursor


def train(model: LNModel, sampler: Sampler, cfg: TrainConfig, schedule: Schedule, run_dir: Path, *,
          sigma: SigmaRule | None = None, calibration_batches: list[Tensor] | None = None, resume: bool = False,
          mode: str = "lnfree", source: RunSource | None = None, progress: bool = True,
          val_batches: list[Tensor] | None = None, report_to: tuple[str, ...] = (),
          teacher: LNModel | None = None) -> RunResult:
    """Run (or resume) `schedule.total_steps` optimizer steps, writing metrics.jsonl and checkpoints to run_dir.

    mode: "lnfree" (the schedule removes LNs; σ̂ measured and followed by `sigma`), "control" (same run, every
    LN kept, no statistics), "pretrain" (from scratch). `val_batches` are scored every `cfg.eval_every` steps;
    `report_to` names reporters (tensorboard, wandb) that receive every metrics record; `teacher` is the original
    model that cfg.distill_weight distills from (not saved: a resume loads it again). Under torchrun every
    rank calls this (lnfree.distributed); rank 0 writes the run's files and gets the trained model back.
    """
    sigma = sigma or SigmaRule()
    run_dir = Path(run_dir)
    check_settings(cfg.to_dict())
    if cfg.eval_every and not val_batches:
        raise ValueError("--eval-every needs validation data; pass val batches (the run's val split)")
    world, device = distributed.init(cfg.device, fsdp=cfg.fsdp, timeout_s=cfg.dist_timeout)
    check_reporters(report_to)
    seqs_per_step = cfg.sequences_per_step()
    main = world.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if device.type == "cpu" and cfg.dtype == "bf16" and not native_bf16_cpu():
            print("lnfree: note: --dtype bf16 on a CPU without bf16 instructions (avx512_bf16 or AMX) is emulated and "
                  "slower than fp32 (SmolLM2 here: ~50 against ~200 tokens/s); --dtype auto takes fp32 on CPU",
                  file=sys.stderr, flush=True)
    if cfg.lora_rank:  # before the optimizer and the wrappers see the parameters
        if mode == "pretrain":
            raise ValueError("--lora trains an update of pretrained weights; pretraining trains every weight")
        add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_trainable, cfg.seed)
    stepper = Stepper(model, cfg, schedule, mode=mode, sigma=sigma, world=world, device=device, teacher=teacher)
    optimizer = stepper.optimizer
    history: list[float] = []
    start = 0
    ckpt = None
    if resume:
        ckpt, state = load_latest_readable(run_dir, model, optimizer, world)
        sampler.load_state_dict(state.data)
        start, history = state.step, list(state.history)
        if main:
            _truncate_metrics(run_dir / "metrics.jsonl", start)
    else:
        if main:
            (run_dir / "metrics.jsonl").write_text("")
        if mode == "lnfree":
            if not calibration_batches:
                raise ValueError("an LN-removal run needs calibration batches to measure σ̂")
            calibrate(model, [b.to(device) for b in calibration_batches], sigma)
    stepper.start()
    run_record = RunRecord(mode, cfg, schedule, source or RunSource(), sigma if mode == "lnfree" else None)
    if main:
        run_record.write(run_dir)
    n_sites = len(model.norm_sites())
    tokens_per_step = seqs_per_step * cfg.ctx
    batches = _Batches(sampler, seqs_per_step, world.rank_rows(seqs_per_step, cfg.micro_batch), device)
    reporters = open_reporters(report_to, run_dir, start, run_record.to_dict()) if main else []
    bar = StepProgress(start, schedule.total_steps, f"{mode} {run_dir.name}", enabled=progress and main)
    peak = PeakMemory(device)
    t_start, loss_value, last_ckpt, step = time.time(), float("nan"), ckpt, start
    try:
        for step in range(start, schedule.total_steps):
            t0 = time.time()
            done = step + 1 == schedule.total_steps
            lr, states, newly_frozen = stepper.begin(step)
            batch = batches.take()
            figures = stepper.compute(step, batch, before_read=None if done else batches.read_ahead)
            loss_value, grad_norm = figures.ce, figures.grad_norm
            # every rank sees the same global loss; a non-finite one is traced to its site
            _guard(loss_value, history, cfg, step, last_ckpt,
                   _where_nonfinite(model, batch[: cfg.micro_batch], cfg, device, world, loss_value),
                   {"gradient norm": grad_norm, "auxiliary loss": figures.aux,
                    "distillation loss": figures.distill})
            stepper.finish()
            history = (history + [loss_value])[-50:]
            dt = time.time() - t0
            validate = cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or done)
            val_loss = (validation_loss(model, val_batches, cfg, device)
                        if validate and (main or world.fsdp) else None)  # a sharded model's forwards are collective
            if main:
                frozen = sum(state.frozen for state in states.values())
                record = {"step": step, "loss": loss_value, "aux_loss": figures.aux, "lr": lr,
                          "tokens": (step + 1) * tokens_per_step, "tokens_per_s": tokens_per_step / dt,
                          "peak_mem_gib": peak.gib(), "grad_norm": grad_norm, "frozen_sites": frozen,
                          "n_sites": n_sites}
                if cfg.distill_weight:
                    record["distill_loss"] = figures.distill
                if val_loss is not None:
                    record["val_loss"] = val_loss
                if mode == "lnfree":
                    record["sigma"] = sigma_record(model)
                if newly_frozen:
                    record["events"] = newly_frozen
                _log(run_dir, record, reporters, bar)
            if done or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
                state = RunState(step=step + 1, data=batches.state_dict(),
                                 model_config=FAMILIES[model.family].config_dict(model), family=model.family,
                                 history=history)
                last_ckpt = save_checkpoint(run_dir, model, optimizer, state, keep=cfg.keep_checkpoints,
                                            world=world)
    except RuntimeError as e:  # a collective another rank never joined: say which rank, and what was kept
        if world.active and distributed.is_comm_error(e):
            raise distributed.peer_lost(world, e, step, cfg.dist_timeout, last_ckpt) from None
        raise
    finally:
        bar.close()
        for reporter in reporters:
            reporter.close()
    steps_run = schedule.total_steps - start
    return RunResult(steps_run=steps_run, final_loss=loss_value, tokens=steps_run * tokens_per_step,
                     wall_seconds=time.time() - t_start, model=whole_model(model, world))


def _log(run_dir: Path, record: dict, reporters: list, bar: StepProgress) -> None:
    """One metrics line, the reporters' scalars and the progress bar's figures (rank 0)."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if reporters:
        values = scalars(record)
        for reporter in reporters:
            reporter.log(record["step"], values)
    shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", "tok_s": f"{record['tokens_per_s']:,.0f}",
             "frozen": f"{record['frozen_sites']}/{record['n_sites']}"}
    if "val_loss" in record:
        shown["val"] = f"{record['val_loss']:.4f}"
    bar.update(record["step"], shown)


def _where_nonfinite(model: LNModel, idx: Tensor, cfg: TrainConfig, device: torch.device,
                     world: distributed.World, loss: float) -> str | None:
    """After a non-finite loss: the first norm site whose output overflowed on this rank's first micro-batch (not
    under FSDP2, whose forwards are collective); None for a finite loss."""
    if math.isfinite(loss) or world.fsdp:
        return None
    from ..method.diagnose import first_nonfinite_site

    return first_nonfinite_site(model, idx, autocast(cfg, device))


def _guard(loss: float, history: list[float], cfg: TrainConfig, step: int, last_ckpt: Path | None,
           cause: str | None = None, must_be_finite: dict[str, float] | None = None) -> None:
    """Stop before the optimizer applies a non-finite or spiking step; the last checkpoint stays as it was. `cause`
    names the site where a non-finite forward overflowed; `must_be_finite` are the step's other figures (a finite
    CE beside a NaN gradient would otherwise write NaN into every weight)."""
    where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint written yet"
    nonfinite = [name for name, value in (must_be_finite or {}).items() if not math.isfinite(value)]
    if math.isfinite(loss) and nonfinite:
        raise TrainingDiverged(f"step {step}: {' and '.join(nonfinite)} not finite (loss {loss:.4g}); "
                               f"the step was not applied; stopped ({where}); a gentler preset or a lower --lr")
    bad = not math.isfinite(loss)
    if not bad and len(history) >= 10:
        bad = loss > cfg.spike_factor * statistics.median(history)
    if bad:
        if cause:
            raise TrainingDiverged(f"step {step}: loss {loss:.4g} is not finite: {cause}; stopped ({where}); a "
                                   "gentler preset (more steps per freeze, the position-0 special) or a lower --lr")
        raise TrainingDiverged(f"step {step}: loss {loss:.4g} is not finite or > {cfg.spike_factor}× the recent "
                               f"median; stopped ({where}); resume with a lower --lr or a gentler preset")


def _truncate_metrics(path: Path, start: int) -> None:
    """Drop metric lines of steps at or after `start` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    keep = [record for record in read_jsonl(path) if record["step"] < start]  # a torn last line goes too
    atomic_write(path, "".join(json.dumps(record) + "\n" for record in keep))
