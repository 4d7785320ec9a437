"""One optimizer step of a run, and what it is made of: the lr schedule, AdamW's parameter groups, the next-token
loss, bf16 autocast, and `Stepper` — the step itself, which `train.py`'s loop runs and the benchmarks time.
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed
from ..method.aux import PER_NORM_KINDS, aux_std_loss
from ..method.calibrate import apply_site_states
from ..method.model_sites import collect_norm_stats, ema_step, set_sigma_rule, set_static_graph, uniformity_terms
from ..method.schedule import Schedule
from ..method.sigma import SigmaRule
from ..models.base import LNModel
from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from 0, then cosine decay to cfg.min_lr at cfg.decay_steps (default: cfg.steps), flat after.

    The schedule of both papers' code: nanoGPT's `get_lr` (Heimersheim 2024) and transformers'
    `cosine_with_min_lr` with warmup (Baroni et al. 2025) — step 0 runs at lr 0.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    horizon = cfg.decay_steps if cfg.decay_steps is not None else cfg.steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: LNModel, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings, on LN gains only with cfg.decay_norm_weights, never on
    biases. The fused kernel on every device: on CPU torch's default is a loop over tensors, ~15× slower for
    GPT-2 small (1.5 s against 0.1 s a step on 2 cores, benchmarks/train_step.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    gains = {id(layer.weight) for layer in model.norm_layers()} if cfg.decay_norm_weights else set()
    decayed = lambda p: p.dim() >= 2 or id(p) in gains
    groups = [{"params": [p for p in params if decayed(p)], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if not decayed(p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type in ("cuda", "cpu"))


def _next_tokens(idx: Tensor) -> Tensor:
    """(B·T,) targets: each position's next token; the last position has none and is ignored (-100), so the
    (B, T, V) logits are never sliced and copied."""
    return F.pad(idx[:, 1:], (0, 1), value=-100).flatten()


def next_token_loss(logits: Tensor, idx: Tensor) -> Tensor:
    """Mean CE over every next-token prediction within each sequence (EOT targets count)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), _next_tokens(idx), ignore_index=-100)


def teacher_log_probs(teacher: LNModel, idx: Tensor) -> Tensor:
    """(B·T, V) the original model's next-token log-probabilities, in fp32, without a graph."""
    with torch.no_grad():
        return F.log_softmax(teacher(idx).flatten(0, 1).float(), dim=-1)


def distill_losses(logits: Tensor, idx: Tensor, teacher_log_p: Tensor) -> tuple[Tensor, Tensor]:
    """`next_token_loss` and the mean over every position of KL(teacher ‖ model), from one log-softmax of the
    logits: the forward KL of knowledge distillation (Hinton et al. 2015, temperature 1), which pulls the model
    toward every token the original gives mass to, not only the one in the text."""
    log_q = F.log_softmax(logits.flatten(0, 1).float(), dim=-1)
    ce = F.nll_loss(log_q, _next_tokens(idx), ignore_index=-100)
    return ce, F.kl_div(log_q, teacher_log_p, log_target=True, reduction="batchmean")


class StepFigures(NamedTuple):
    """One optimizer step's global means, read from the device once."""

    ce: float
    aux: float
    distill: float
    grad_norm: float


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), where oneDNN runs bf16 matmuls natively
    rather than emulating them (on this project's 2-core machines: a plain bf16 matmul ~3.7× fp32)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the run computes in bf16 autocast: asked for, or "auto" on CUDA (fp32 master weights either way)."""
    return cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")


def autocast(cfg: TrainConfig, device: torch.device):
    """The run's autocast context (a no-op when it computes in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(cfg, device) else contextlib.nullcontext()


class Stepper:
    """One optimizer step of a run, exactly as `train` runs it — the schedule's site states, forward and backward
    over the micro-batches, the clip, AdamW, the σ̂ EMA — so that benchmarks/train_step.py times the real thing.

    No host syncs inside the step: site states are Python-side flags set here at the step boundary (a buffer
    write only when one changes), σ̂ statistics and the aux loss stay on the device, and the step's CE, aux loss
    and grad norm come back in one read. `teacher` (with cfg.distill_weight > 0): the original model, every norm
    live, whose next-token distributions the model is distilled toward."""

    def __init__(self, model: LNModel, cfg: TrainConfig, schedule: Schedule, *, mode: str = "lnfree",
                 sigma: SigmaRule | None = None, world: distributed.World = distributed.SINGLE,
                 device: torch.device | str = "cpu", teacher: LNModel | None = None):
        if cfg.distill_weight > 0 and teacher is None:
            raise ValueError("--distill-weight needs the original model as the teacher")
        self.model, self.cfg, self.schedule, self.mode, self.world = model, cfg, schedule, mode, world
        self.teacher = teacher.to(device).eval().requires_grad_(False) if cfg.distill_weight > 0 else None
        self.sigma = sigma or SigmaRule()
        self.device = torch.device(device)
        self.n_micro = distributed.check_batch_layout(cfg.sequences_per_step(), cfg.micro_batch, world)
        self.collect = mode == "lnfree" and self.sigma.collects
        model.train()
        model.gradient_checkpointing = cfg.activation_checkpointing
        set_static_graph(model, cfg.compile)  # compiled: one graph for every site state
        self.wrapped = distributed.wrap(model, world, self.device, cfg.compile)  # FSDP2 shards `model` in place
        self.optimizer = make_optimizer(model, cfg, self.device)

    def start(self) -> None:
        """After calibration or a resume: σ̂ follows its rule from here, dropout as configured."""
        if self.collect:  # "call": one σ̂ update per global micro-step
            set_sigma_rule(self.model, self.sigma, micro_batches_per_step=self.n_micro)
        self.model.set_dropout(self.cfg.dropout)

    def begin(self, step: int) -> tuple[float, dict, list[str]]:
        """Site states and lr of `step`: (lr, states, the sites that froze just now)."""
        states = self.schedule.state_at(step) if self.mode == "lnfree" else {}
        newly_frozen = apply_site_states(self.model, states) if states else []
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr, states, newly_frozen

    def compute(self, step: int, batch: Tensor, before_read=None) -> StepFigures:
        """Forward and backward over this rank's micro-batches of one optimizer step, then the clip; returns the
        global mean CE, aux and distillation losses and the grad norm, read from the device once. `before_read`
        runs when the work is queued and before that read (the next batch's prefetch overlaps the device's
        compute)."""
        cfg, model, world, device = self.cfg, self.model, self.world, self.device
        sums = torch.zeros(3, device=device)  # CE, aux, distillation — on device until the step's single read
        for j, idx in enumerate(batch.split(cfg.micro_batch)):
            distill, teacher_log_p = torch.zeros((), device=device), None
            if self.teacher is not None:
                with autocast(cfg, device):
                    teacher_log_p = teacher_log_probs(self.teacher, idx)
            # dropout masks belong to the global micro-batch, whichever rank runs it (and survive a resume)
            torch.manual_seed(distributed.micro_seed(cfg.seed, step, world.global_micro_index(j)))
            with distributed.gradient_sync(self.wrapped, world, last=j == self.n_micro - 1):
                with collect_norm_stats(model) if self.collect else contextlib.nullcontext(), autocast(cfg, device):
                    if cfg.aux_weight > 0 and cfg.aux_kind in PER_NORM_KINDS:
                        with uniformity_terms(model, cfg.aux_kind) as terms:
                            logits = self.wrapped(idx)
                        aux = torch.stack(terms).mean()
                    elif cfg.aux_weight > 0:
                        logits, final_std = self.wrapped(idx, return_final_std=True)
                        aux = aux_std_loss(final_std.float(), model.eot_mask(idx), cfg.aux_kind)
                    else:
                        logits, aux = self.wrapped(idx), torch.zeros((), device=device)
                    if teacher_log_p is None:
                        ce = next_token_loss(logits, idx)
                    else:
                        ce, distill = distill_losses(logits, idx, teacher_log_p)
                ((ce + cfg.aux_weight * aux + cfg.distill_weight * distill) / self.n_micro).backward()
            sums += torch.stack([ce.detach(), aux.detach(), distill.detach()])
        distributed.all_reduce_sum_(sums)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        if before_read is not None:
            before_read()
        return StepFigures(*torch.cat([sums / (self.n_micro * world.size), grad_norm.reshape(1).to(sums)]).tolist())

    def finish(self) -> None:
        """AdamW, then one EMA update of σ̂ at live sites from this step's training forwards ("step" rule)."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.collect and self.sigma.ema == "step":
            ema_step(self.model, self.sigma.momentum)

    def run(self, step: int, batch: Tensor) -> float:
        """One whole step without the spike guard (what a benchmark times); returns the CE."""
        self.begin(step)
        figures = self.compute(step, batch)
        self.finish()
        return figures.ce
