"""Commands that read models and runs: `eval` (the papers' CE protocol and lm-eval benchmarks, as tables), `plot` (a
run's curves) and `compare` (an LN-free model against its original, as a report)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .flags import add_shared

# the dataset names `lnfree.analysis.eval_data.EVAL_DATASETS` knows, written out: importing it would load torch
EVAL_DATA_NAMES = "owt-val, pile, pile-filtered, stdlib-val"


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="CE on OpenWebText / The Pile (papers' protocol), lm-eval benchmarks, tables")
    p.add_argument("models", nargs="+", help="model folders, run folders (their final/) or hub ids")
    p.add_argument("--data", default="", help=f"comma list: {EVAL_DATA_NAMES} or a PATH")
    p.add_argument("--tokens", type=int, help="evaluate only the first N tokens of each dataset")
    add_shared(p, "--ctx")
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
    add_shared(p, "--tokenizer", "--device")
    p.add_argument("--top-k", type=int, default=5, help="highest-loss sequences to list per model and dataset")
    add_shared(p, "--cache-dir", "--quiet")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from ..analysis.eval_suite import run_eval
    from ..analysis.tables import format_markdown, with_table

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


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run: loss with removal events, validation CE, σ̂ per site, residual std")
    p.add_argument("run", type=Path, help="run folder of `lnfree remove` (or pretrain)")
    p.add_argument("others", nargs="*", type=Path, help="runs to overlay (default: the run's sibling folders, "
                   "e.g. its vanilla control)")
    p.add_argument("--out", type=Path, help="image file (default RUN/plots.png)")
    p.add_argument("--no-residual", action="store_true", help="skip the residual-std panel (loads no model)")
    add_shared(p, "--cache-dir")
    p.set_defaults(func=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from ..analysis.plots import plot_run

    print(f"wrote {plot_run(args.run, args.others, args.out, not args.no_residual, args.cache_dir)}")
    return 0


# compare's defaults: its flags', and what the command line it records leaves out
COMPARE_DEFAULTS = {"tokens": 16384, "batch_size": 4, "top_neurons": 20}


def add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="an LN-free model against its original: outputs, per-component mechanisms, "
                       "activation patching; report.md + report.json + figures",
                       usage="lnfree compare ORIGINAL LNFREE [--vanilla V] --data SOURCE --out DIR [options]")
    p.add_argument("original", help="the original model (folder, run folder or hub id)")
    p.add_argument("lnfree", help="the LN-free model (a finished run, folded or eps=1e12 model)")
    p.add_argument("--vanilla", help="the vanilla fine-tuned control, compared too")
    p.add_argument("--data", required=True, help=f"evaluation data: {EVAL_DATA_NAMES} or a PATH")
    p.add_argument("--out", required=True, type=Path, help="report folder (report.md, report.json, figures)")
    p.add_argument("--prompts", help="comma list of prompt sets for patching: ioi-gpt2, stdlib-copy or JSONL paths "
                   "(default: every packaged set the tokenizer reads)")
    p.add_argument("--tokens", type=int, default=COMPARE_DEFAULTS["tokens"],
                   help="compare on the first N tokens of --data [%(default)s]")
    add_shared(p, "--ctx")
    p.add_argument("--batch-size", type=int, default=COMPARE_DEFAULTS["batch_size"],
                   help="sequences per batch [%(default)s]")
    p.add_argument("--top-neurons", type=int, default=COMPARE_DEFAULTS["top_neurons"],
                   help="neurons listed as changed most [%(default)s]")
    add_shared(p, "--tokenizer", "--device", "--cache-dir", "--quiet")
    p.set_defaults(func=_run_compare)


def _compare_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this comparison (its options that differ from their defaults)."""
    import shlex

    words = ["lnfree", "compare", args.original, args.lnfree]
    for key in ("vanilla", "data", "out", "prompts", "tokens", "ctx", "batch_size", "top_neurons", "tokenizer",
                "device", "cache_dir"):
        value = getattr(args, key)
        if value is not None and value != COMPARE_DEFAULTS.get(key):
            words += ["--" + key.replace("_", "-"), str(value)]
    return shlex.join(words)


def _run_compare(args: argparse.Namespace) -> int:
    from ..analysis.compare import run_compare
    from ..analysis.compare_report import headline

    prompts = [x.strip() for x in args.prompts.split(",") if x.strip()] if args.prompts else None
    result = run_compare(args.original, args.lnfree, args.data, vanilla=args.vanilla, out=args.out, prompts=prompts,
                         ctx=args.ctx, max_tokens=args.tokens, batch_size=args.batch_size, device=args.device,
                         tokenizer=args.tokenizer, top_neurons=args.top_neurons, cache_root=args.cache_dir,
                         progress=not args.quiet, command=_compare_command(args))
    print("\n".join(headline(result)))
    print(f"wrote {args.out / 'report.md'}")
    return 0
