"""Whole runs as library calls — what `lnfree remove` and `lnfree pretrain` do, usable from Python too.

A run folder holds run.json (settings, schedule), metrics.jsonl, loss.png, checkpoints/ and, at the end,
final/ — a `transformers` checkpoint (LN-free runs: folded, no normalization) with the tokenizer beside it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import distributed
from ..analysis.plots import plot_with_siblings
from ..data import DataSourceError, SequenceSampler, build_token_cache
from ..method.schedule import Schedule, SiteSpec, control_schedule, layout_depth, standard_layout
from ..method.sigma import SigmaRule
from ..models import save_model
from ..models.base import LNModel
from ..sources import load_source
from ..tokenizer import load_tokenizer, tokenizer_fingerprint
from . import rundir
from .config import RESUME_SAFE, SIGMA_OVERRIDES, TrainConfig, check_settings
from .recipes import PAPER_FAMILY, default_preset, describe_training, for_family, recipe_schedule
from .record import RunRecord, RunSource
from .train import RunResult, train

# Calibration draws from its own stream so that an LN-free run and its control see the same training data.
_CALIBRATION_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class RemovalPlan:
    """What a removal run will do: training settings, σ̂ rule and schedule, after the command line's overrides."""

    train: TrainConfig
    sigma: SigmaRule
    schedule: Schedule
    preset: str
    notes: tuple[str, ...] = ()  # what the preset became on this model (recipes.for_family)


def removal_plan(layout: list[SiteSpec] | int, preset: str, overrides: dict, family: str = PAPER_FAMILY,
                 params: int | None = None) -> RemovalPlan:
    """The preset over a model's sites (or the standard layout of that many blocks) with command-line overrides;
    a per-size preset takes its GPT-2 size from the family and `params` (the model's parameter count).
    A run of another length than the preset's (`steps`, or another depth) stretches the schedule, the warmup
    and the lr decay horizon alike, unless the warmup or horizon is given explicitly."""
    layout = standard_layout(layout) if isinstance(layout, int) else layout
    recipe, notes = for_family(preset, family, layout_depth(layout), params)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    check_settings(overrides)
    schedule = recipe_schedule(recipe, layout, overrides.get("steps"))
    cfg = recipe.train
    stretch = schedule.total_steps / cfg.steps
    if stretch != 1:
        cfg = replace(cfg, warmup_steps=round(cfg.warmup_steps * stretch),
                      decay_steps=None if cfg.decay_steps is None else round(cfg.decay_steps * stretch))
    sigma = replace(recipe.sigma, **{SIGMA_OVERRIDES[k]: v for k, v in overrides.items() if k in SIGMA_OVERRIDES})
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if k not in SIGMA_OVERRIDES})
    return RemovalPlan(replace(cfg, steps=schedule.total_steps), sigma, schedule, recipe.name, notes)


def _check_vocab(model: LNModel, tokenizer, where: str) -> None:
    if len(tokenizer) > model.vocab_size:
        raise ValueError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{model.vocab_size}; use the model's own tokenizer")


def token_need(cfg: TrainConfig) -> int:
    """Tokens of the sample a run reads from (or --max-train-tokens): `sample_factor` × every step's batch, so the
    sequences a run reads are spread over that many times more documents (stdlib analog, one seed: the vanilla
    control's validation CE 3.769 after a sample of the run's size, 3.727 after 4×, 3.721 after the whole split;
    the original 3.728).
    Calibration draws from the same sequences. Neither the micro-batch size nor the world size changes it: they
    change how a step is computed, never which data it reads."""
    if cfg.max_train_tokens is not None:
        if cfg.max_train_tokens < cfg.ctx * cfg.micro_batch:
            raise ValueError(f"--max-train-tokens {cfg.max_train_tokens} is less than one micro-batch "
                             f"({cfg.micro_batch} × {cfg.ctx} tokens)")
        return cfg.max_train_tokens
    return math.ceil(max(cfg.sample_factor * cfg.steps * cfg.batch_tokens,
                         cfg.calibration_batches * cfg.micro_batch * cfg.ctx))


def _token_stream(data: str, tokenizer, cfg: TrainConfig, cache_root: Path | None, progress: bool,
                  sample: bool = True):
    """(token cache, sequence window): a sampled cache covering the run's need, read in its first `window`
    sequences — or the whole split (`full_cache`, pretraining), window None. A step that cannot be laid out (batch
    vs micro-batch, or over this many processes) is refused before anything is read."""
    distributed.check_batch_layout(cfg.sequences_per_step(), cfg.micro_batch, distributed.current())
    if sample and not cfg.full_cache:
        need = token_need(cfg)
        cache = build_token_cache(data, tokenizer, split="train", cache_root=cache_root, progress=progress,
                                  need_tokens=need)
        window = -(-need // cfg.ctx)
    else:
        cache = build_token_cache(data, tokenizer, split="train", cache_root=cache_root, progress=progress)
        window = None
    if cache.n_sequences(cfg.ctx) < cfg.micro_batch:
        raise ValueError(f"data source {data!r} has only {cache.n_sequences(cfg.ctx)} sequences of {cfg.ctx} "
                         f"tokens; give more text or a smaller --ctx")
    return cache, window


def _validation_batches(data: str, eval_data: str | None, tokenizer, cfg: TrainConfig, cache_root: Path | None,
                        progress: bool) -> list | None:
    """The first `cfg.eval_tokens` tokens (whole sequences, at least one) of the training source's val split, or
    of all of `eval_data` when given, in micro-batches; None when the run does not validate."""
    if not cfg.eval_every:
        return None
    source, split = (eval_data, "all") if eval_data else (data, "val")
    try:
        cache = build_token_cache(source, tokenizer, split=split, cache_root=cache_root, progress=progress)
    except DataSourceError as e:
        raise ValueError(f"--eval-every: no validation data in {source!r} ({str(e).splitlines()[0]}); pass "
                         "--eval-data with a held-out source, or --eval-every 0") from None
    n = min(cache.n_sequences(cfg.ctx), max(1, cfg.eval_tokens // cfg.ctx))
    if n < 1:
        raise ValueError(f"the val split of {source!r} holds no sequence of {cfg.ctx} tokens; pass --eval-data")
    out, left = [], n
    for batch in SequenceSampler(cache, cfg.ctx, shuffle=False).iter_batches(cfg.micro_batch):
        out.append(batch[:left])
        left -= len(out[-1])
        if left <= 0:
            break
    return out


def run_removal(model_source: str, data: str, out_dir: Path, *, preset: str | None = None,
                overrides: dict | None = None, control: bool = False, resume: bool = False,
                overwrite: bool = False, cache_root: Path | None = None, progress: bool = True,
                show_plan: bool = False, eval_data: str | None = None,
                report_to: tuple[str, ...] = ()) -> RunResult:
    """Fine-tune `model_source` on `data`, removing every LN by `preset` (default baroni2025), or keeping them
    (control). `out_dir` holds one run (see lnfree.run.rundir): new and empty, `resume`d, or cleared with
    `overwrite`. `show_plan` prints the preset's settings and timeline first. With `eval_every` set, validation
    CE is measured on `eval_data`'s val split (default: `data`'s); `report_to` adds TensorBoard / W&B. Under
    torchrun every rank calls this and they make one run (lnfree.distributed)."""
    out_dir = Path(out_dir)
    check_settings({k: v for k, v in (overrides or {}).items() if v is not None})  # before anything is touched
    world = _join_world(overrides or {})
    with _run_folder(out_dir, resume, overwrite, world):
        return _run_removal(model_source, data, out_dir, preset, overrides or {}, control, resume, cache_root,
                            progress and world.is_main, show_plan and world.is_main, eval_data, tuple(report_to),
                            world)


def _join_world(overrides: dict) -> distributed.World:
    """The process group of a torchrun launch (nothing in one process), joined before anything is read or written."""
    defaults = TrainConfig()
    get = lambda name: overrides.get(name) if overrides.get(name) is not None else getattr(defaults, name)
    world, _ = distributed.init(get("device"), fsdp=get("fsdp"), timeout_s=get("dist_timeout"))
    return world


@contextlib.contextmanager
def _run_folder(out_dir: Path, resume: bool, overwrite: bool, world: distributed.World) -> Iterator[None]:
    """Rank 0 checks, clears (when asked) and locks the run folder; the other ranks learn its verdict."""
    with contextlib.ExitStack() as stack:
        error = None
        if world.is_main:
            try:
                stack.enter_context(rundir.locked(out_dir))  # first: nothing is cleared under a running run
                rundir.prepare(out_dir, resume=resume, overwrite=overwrite)
                rundir.remove_stale_temps(out_dir)
            except Exception as e:  # noqa: BLE001 - re-raised here, reported to the other ranks
                error = e
        if world.broadcast(error is not None):
            if error is not None:
                raise error
            raise distributed.PeerFailed("rank 0 refused the run folder")
        try:
            yield
        except BaseException:
            if world.is_main and not resume:
                rundir.discard_unstarted(out_dir)
            raise


def _run_removal(model_source, data, out_dir, preset, overrides, control, resume, cache_root, progress,
                 show_plan, eval_data, report_to, world) -> RunResult:
    model, where = load_source(model_source)
    model_dir = where.model_dir
    if not model.has_normalization or all(s.is_frozen for s in model.norm_sites().values()):
        raise ValueError(f"{model_source} has no live LayerNorm to remove")
    broken = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise ValueError(f"{model_source} holds non-finite weights ({len(broken)} tensor(s), e.g. {broken[0]}): "
                         "nothing can be fine-tuned from NaN or inf; restore the model files")
    tokenizer = load_tokenizer(model_dir)
    _check_vocab(model, tokenizer, str(model_source))
    plan = removal_plan(model.site_layout(), preset or default_preset(model.family), overrides, model.family,
                        sum(p.numel() for p in model.parameters()))
    cfg, sigma, schedule = plan.train, plan.sigma, plan.schedule
    mode = "control" if control else "lnfree"
    if resume:  # continue exactly what was started, and refuse a command line that would change it
        rundir.check_resume_matches(out_dir, mode, str(model_source), data, plan.preset if preset else None,
                                    {k: v for k, v in overrides.items() if v is not None})
        saved = RunRecord.read(out_dir)
        safe = {k: v for k, v in overrides.items() if k in RESUME_SAFE and v is not None}
        cfg, schedule, sigma = replace(saved.train, **safe), saved.schedule, saved.sigma or sigma
    elif control:
        # The vanilla control: the identical run with every LayerNorm kept and without the auxiliary and
        # distillation losses, which belong to the removal (the 2025 code trained its control with the aux loss).
        schedule, cfg = control_schedule(schedule.total_steps), replace(cfg, aux_weight=0.0, distill_weight=0.0)
    if show_plan and not control:
        print(f"# preset {plan.preset} on {model.n_layers} layers, {schedule.total_steps} steps")
        print(f"# {describe_training(cfg, sigma)}")
        for note in plan.notes:
            print(f"# note: {note}")
        if world.active:
            per_rank = cfg.sequences_per_step() // (cfg.micro_batch * world.size)
            print(f"# {world.size} processes ({'FSDP2' if world.fsdp else 'DDP'}): {per_rank} micro-batch(es) of "
                  f"{cfg.micro_batch} sequences per rank per step")
        print(schedule.format_timeline(), flush=True)
    if cfg.ctx > model.context_length:
        raise ValueError(f"--ctx {cfg.ctx} exceeds the model's context of {model.context_length} tokens")
    with world.local_main_first():  # one rank per node tokenizes; the others open what it wrote
        cache, window = _token_stream(data, tokenizer, cfg, cache_root, progress)
        val = _validation_batches(data, eval_data, tokenizer, cfg, cache_root, progress)
    sampler = SequenceSampler(cache, cfg.ctx, seed=cfg.seed, window=window)
    calib = SequenceSampler(cache, cfg.ctx, seed=cfg.seed + _CALIBRATION_SEED_OFFSET, window=window)
    calibration = [calib.next_batch(cfg.micro_batch) for _ in range(cfg.calibration_batches)]
    source = RunSource(data=data, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                       data_manifest=cache.manifest, model=str(model_source), preset=plan.preset,
                       data_window_sequences=window, eval_data=(eval_data or data) if val else None,
                       model_gguf=where.gguf or None)
    # the teacher is the model as loaded, before a checkpoint (on resume) or training changes it
    teacher = copy.deepcopy(model) if cfg.distill_weight > 0 else None
    result = train(model, sampler, cfg, schedule, out_dir, sigma=sigma, calibration_batches=calibration,
                   resume=resume, mode=mode, source=source, progress=progress, val_batches=val, report_to=report_to,
                   teacher=teacher)
    if world.is_main:
        final = result.model.fold() if not control else result.model
        save_model(final.float(), out_dir / "final", tokenizer_from=model_dir)
        plot_with_siblings(out_dir)
    return result


def run_pretrain(model: LNModel, tokenizer_dir: Path, data: str, out_dir: Path, cfg: TrainConfig, *,
                 resume: bool = False, overwrite: bool = False, cache_root: Path | None = None,
                 progress: bool = True, eval_data: str | None = None, report_to: tuple[str, ...] = ()) -> RunResult:
    """Train `model` from its initialisation with every LN live (the offline analog's pretraining); `out_dir`
    holds one run, as for `run_removal`."""
    out_dir = Path(out_dir)
    check_settings(cfg.to_dict())
    world = _join_world(cfg.to_dict())
    with _run_folder(out_dir, resume, overwrite, world):
        return _run_pretrain(model, tokenizer_dir, data, out_dir, cfg, resume, cache_root, progress and world.is_main,
                             eval_data, tuple(report_to), world)


def _run_pretrain(model, tokenizer_dir, data, out_dir, cfg, resume, cache_root, progress, eval_data,
                  report_to, world) -> RunResult:
    tokenizer = load_tokenizer(tokenizer_dir)
    _check_vocab(model, tokenizer, str(tokenizer_dir))
    with world.local_main_first():
        cache, _ = _token_stream(data, tokenizer, cfg, cache_root, progress, sample=False)  # pretraining: every token
        val = _validation_batches(data, eval_data, tokenizer, cfg, cache_root, progress)
    source = RunSource(data=data, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                       data_manifest=cache.manifest)
    result = train(model, SequenceSampler(cache, cfg.ctx, seed=cfg.seed), cfg, control_schedule(cfg.steps),
                   out_dir, resume=resume, mode="pretrain", source=source, progress=progress, val_batches=val,
                   report_to=report_to)
    if world.is_main:
        save_model(result.model.float(), out_dir / "final", tokenizer_from=tokenizer_dir)
        plot_with_siblings(out_dir)
    return result
