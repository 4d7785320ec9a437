"""Rank removal presets on the offline analogs: each preset's LN-free − vanilla CE gap, seeds side by side.

Uses the demo's cached pretrained analog (`--hard`: the one with a planted position-0 writer; pretrains it first
if absent) and fine-tunes it with each preset on the same budget (default 5% of pretraining tokens). Every
preset keeps its own shape — schedule, warmup and lr horizon stretched to the budget, betas, weight decay,
dropout, auxiliary loss, σ̂ rule, specials — on the analog's batch, and its lr scaled by `--lr-scale` (the
analog's fine-tuning lr over GPT-2's 6e-4). The vanilla control of a preset is the same run without removal
and without the auxiliary loss; presets whose controls would be identical share one. Prints a Markdown table
(mean ± SD over seeds) and writes analog_bench.json. No assertions: this is a measurement.

    .venv/bin/python benchmarks/analog.py --seeds 0 1 2 [--hard] [--methods ...] [--lora 16 64] [--distill 1]
                                          [--out DIR]

With `--lora R …` every method is also run with LoRA at each rank (its control too, at the same rank), and a
second table sets each against full fine-tuning: CE, gap, trainable parameters, wall time. With `--distill W …`
every method is also run with distillation from the original at each weight (`--distill-weight`; the same control).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from lnfree.data import SequenceSampler, build_token_cache
from lnfree.demo import DemoConfig, demo_cache_dir, prepare_pretrained, prepare_tokenizer, shipped_analog, val_ce
from lnfree.models import load_model
from lnfree.run.config import TrainConfig
from lnfree.run.recipes import PRESETS, get_recipe
from lnfree.run.runs import removal_plan, run_removal
from lnfree.tokenizer import load_tokenizer

DEFAULT_METHODS = ["heimersheim2024", "baroni2025", "baroni2025-small-noaux", "all-at-once", "lnfree"]


def register_candidates() -> dict[str, str]:
    """Variants of baroni2025-small tried while choosing `lnfree` (name -> what changes). Benchmark-only."""
    from lnfree.method.schedule import SITE_KINDS, standard_layout

    def variant(name, *, specials=False, flat_lr=False, step_ema=False):
        def preset(n_layer):
            r = get_recipe("baroni2025", n_layer)
            spec, train, sigma = r.removal, r.train, r.sigma
            if specials:  # position 0 and EOT keep their own σ̂ at every site, eased out one site at a time
                spec = replace(spec, eot_kinds=SITE_KINDS, bos_kinds=SITE_KINDS, eot_after=2, bos_after=2,
                               special_span=len(standard_layout(n_layer)), eot_ramp=2, bos_ramp=2)
                sigma = replace(sigma, positions="apart")
            if flat_lr:  # no decay before the last removal: the cosine's horizon at twice the run
                train = replace(train, decay_steps=2 * train.steps)
            if step_ema:  # one EMA update per optimizer step that keeps the reference's per-step fraction
                sigma = replace(sigma, ema="step", momentum=sigma.momentum ** sigma.reference_calls,
                                tracking="site")
            return replace(r, name=name, removal=spec, train=train, sigma=sigma)
        PRESETS[name] = preset

    candidates = {
        "cand-specials": dict(specials=True),
        "cand-flat-lr": dict(flat_lr=True),
        "cand-step-ema": dict(step_ema=True),
        "cand-specials-flat-lr": dict(specials=True, flat_lr=True),
    }
    for name, kw in candidates.items():
        variant(name, **kw)
    return {name: ", ".join(kw) for name, kw in candidates.items()}


def main() -> None:
    candidates = register_candidates()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(PRESETS))
    ap.add_argument("--ft-fraction", type=float, default=0.05)
    ap.add_argument("--lr-scale", type=float, default=0.5, help="analog fine-tuning lr / GPT-2's (3e-4 / 6e-4)")
    ap.add_argument("--hard", action="store_true", help="the analog with a planted position-0 writer")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="training dtype (bf16: autocast, also on "
                    "CPU); evaluation is fp32 either way")
    ap.add_argument("--lora", type=int, nargs="*", default=[], help="also run each method with LoRA at these ranks")
    ap.add_argument("--distill", type=float, nargs="*", default=[],
                    help="also run each method with --distill-weight at these weights")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="analog-bench-")))
    args = ap.parse_args()

    cfg = DemoConfig(ft_fraction=args.ft_fraction, pos0_writer=40.0 if args.hard else 0.0)
    cache = demo_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    shipped = shipped_analog(cfg)  # the packaged analog when it is this one (no 12-minute pretraining)
    tok_dir = shipped or prepare_tokenizer(cfg, cache)
    original = shipped or prepare_pretrained(cfg, tok_dir, cache, cache / "tokens")
    val_cache = build_token_cache("stdlib", load_tokenizer(tok_dir), split="val", cache_root=cache / "tokens",
                                  progress=False)
    val = list(SequenceSampler(val_cache, cfg.ctx, shuffle=False).iter_batches(cfg.eval_batch))
    ce_original = val_ce(load_model(original), val, "original")["mean"]
    n_layer, steps = cfg.n_layer, cfg.ft_steps()
    budget = {"steps": steps, "batch_tokens": cfg.pretrain.batch_tokens, "micro_batch": cfg.pretrain.micro_batch,
              "ctx": cfg.ctx, "dtype": args.dtype}
    rows = ([(m, 0, 0.0) for m in args.methods] + [(m, r, 0.0) for r in args.lora for m in args.methods]
            + [(m, 0, w) for w in args.distill for m in args.methods])  # (method, LoRA rank, distillation weight)
    label = lambda m, r, w=0.0: m + (f" +lora{r}" if r else "") + (f" +kd{w:g}" if w else "")
    ce: dict[str, list[float]] = {label(*row): [] for row in rows}
    controls: dict[str, list[float]] = {label(*row): [] for row in rows}
    trainable: dict[str, int] = {}
    seconds: dict[str, list[float]] = {label(*row): [] for row in rows}
    t0 = time.time()
    for seed in args.seeds:
        control_ce: dict[str, float] = {}  # one control per distinct set of training settings
        for name, rank, weight in rows:
            recipe = get_recipe(name, n_layer)
            over = {**budget, "seed": seed, "lr": recipe.train.lr * args.lr_scale,
                    "min_lr": recipe.train.min_lr * args.lr_scale, **({"lora_rank": rank} if rank else {}),
                    **({"distill_weight": weight} if weight else {})}
            control_train = replace(removal_plan(n_layer, name, over).train, aux_weight=0.0, distill_weight=0.0)
            key = json.dumps(asdict(control_train), sort_keys=True)
            folder = args.out / f"seed{seed}"
            if key not in control_ce:
                run_dir = folder / f"control-{len(control_ce)}"
                run_removal(str(original), "stdlib", run_dir, preset=name, overrides=over, control=True,
                            cache_root=cache / "tokens", progress=False)
                control_ce[key] = val_ce(load_model(run_dir / "final"), val, "control")["mean"]
            row = label(name, rank, weight)
            run_dir = folder / row.replace(" +", "-")
            result = run_removal(str(original), "stdlib", run_dir, preset=name, overrides=over,
                                 cache_root=cache / "tokens", progress=False)
            seconds[row].append(result.wall_seconds)
            trainable[row] = _trainable(original, over)
            ce[row].append(val_ce(load_model(run_dir / "final"), val, row)["mean"])
            controls[row].append(control_ce[key])
            print(f"seed {seed} {row}: CE {ce[row][-1]:.4f}, its control {control_ce[key]:.4f}, "
                  f"gap {ce[row][-1] - control_ce[key]:+.4f} ({time.time() - t0:.0f}s)", flush=True)
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    print(f"\n{'hard' if args.hard else 'plain'} analog; original val CE {ce_original:.4f}; fine-tuning {steps} "
          f"steps × {cfg.pretrain.batch_tokens} tokens ({args.ft_fraction:.0%} of pretraining); lr × {args.lr_scale};"
          f" seeds {args.seeds}; training {args.dtype}; {time.time() - t0:.0f}s\n")
    print("| preset | LN-free val CE | its vanilla control | LN-free − vanilla |\n|---|---|---|---|")
    for name in ce:
        gaps = [a - b for a, b in zip(ce[name], controls[name], strict=True)]
        note = f" ({candidates[name]})" if name in candidates else ""
        print(f"| {name}{note} | {statistics.mean(ce[name]):.4f} ± {sd(ce[name]):.4f} | "
              f"{statistics.mean(controls[name]):.4f} ± {sd(controls[name]):.4f} | "
              f"{statistics.mean(gaps):+.4f} ± {sd(gaps):.4f} |")
    if args.lora:
        print("\n| preset | trainable parameters | LN-free CE − full fine-tuning's (paired) | against full FT's "
              "control | wall per run |\n|---|---|---|---|---|")
        for name, rank, _ in (row for row in rows if row[1]):
            row, full = label(name, rank), label(name, 0)
            vs_full = [a - b for a, b in zip(ce[row], ce[full], strict=True)]
            vs_control = [a - b for a, b in zip(ce[row], controls[full], strict=True)]
            print(f"| {row} | {trainable[row]:,} | {statistics.mean(vs_full):+.4f} ± {sd(vs_full):.4f} | "
                  f"{statistics.mean(vs_control):+.4f} ± {sd(vs_control):.4f} | "
                  f"{statistics.mean(seconds[row]):.0f} s |")
    (args.out / "analog_bench.json").write_text(json.dumps(
        {"ce": ce, "controls": controls, "trainable": trainable, "seconds": seconds, "original": ce_original,
         "hard": args.hard, "seeds": args.seeds, "steps": steps, "lr_scale": args.lr_scale, "dtype": args.dtype},
        indent=1))


def _trainable(model_dir: Path, over: dict) -> int:
    """Parameters a run with these settings trains (all of them without LoRA)."""
    from lnfree.run.lora import add_adapters, count_trainable

    model = load_model(model_dir)
    if over.get("lora_rank"):  # the defaults of TrainConfig's other LoRA settings, as the runs have them
        t = TrainConfig(lora_rank=over["lora_rank"])
        add_adapters(model, t.lora_rank, t.lora_alpha, t.lora_targets, t.lora_trainable, t.seed)
    return count_trainable(model)[0]


if __name__ == "__main__":
    main()
