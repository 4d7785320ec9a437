"""Rank removal methods on the offline analog: LN-free − vanilla CE gap per method, side by side, with seeds.

Uses the demo's cached pretrained analog (pretrains it first if absent) and fine-tunes it with each method
on the same fine-tuning budget (default 5% of pretraining tokens), one vanilla control per seed. Prints a
Markdown table of val CE and gaps (mean ± SD over seeds). No assertions: this is a measurement.

    .venv/bin/python benchmarks/analog.py --seeds 0 1 --out /tmp/analog-bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from lnfree.data import SequenceSampler, build_token_cache
from lnfree.demo import DemoConfig, demo_cache_dir, prepare_pretrained, prepare_tokenizer, val_ce
from lnfree.models import load_model
from lnfree.runs import run_removal
from lnfree.tokenizer import load_tokenizer

# name -> (preset, extra overrides)
METHODS = {
    "baroni2025": ("baroni2025", {}),
    "baroni2025, no aux loss": ("baroni2025", {"aux_weight": 0.0}),
    "heimersheim2024": ("heimersheim2024", {}),
    "all-at-once": ("all-at-once", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--ft-fraction", type=float, default=0.05)
    ap.add_argument("--hard", action="store_true", help="the analog with a planted position-0 writer")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="analog-bench-")))
    args = ap.parse_args()

    cfg = DemoConfig(ft_fraction=args.ft_fraction, pos0_writer=40.0 if args.hard else 0.0)
    cache = demo_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tok_dir = prepare_tokenizer(cfg, cache)
    original = prepare_pretrained(cfg, tok_dir, cache, cache / "tokens")
    val_cache = build_token_cache("stdlib", load_tokenizer(tok_dir), split="val", cache_root=cache / "tokens",
                                  progress=False)
    val = list(SequenceSampler(val_cache, cfg.ctx, shuffle=False).iter_batches(cfg.eval_batch))
    ce_original = val_ce(load_model(original), val, "original")["mean"]
    steps = cfg.ft_steps()
    base = {"steps": steps, "batch_tokens": cfg.pretrain.batch_tokens, "micro_batch": cfg.pretrain.micro_batch,
            "ctx": cfg.ctx, "lr": cfg.ft_lr, "min_lr": cfg.ft_lr, "warmup_steps": 0}
    rows: dict[str, list[float]] = {"vanilla control": []}
    gaps: dict[str, list[float]] = {m: [] for m in args.methods}
    t0 = time.time()
    for seed in args.seeds:
        over = {**base, "seed": seed}
        folder = args.out / f"seed{seed}"
        run_removal(str(original), "stdlib", folder / "control", overrides=over, control=True,
                    cache_root=cache / "tokens", progress=False)
        control = val_ce(load_model(folder / "control" / "final"), val, "control")["mean"]
        rows["vanilla control"].append(control)
        for name in args.methods:
            preset, extra = METHODS[name]
            run_dir = folder / name.replace(" ", "_").replace(",", "")
            run_removal(str(original), "stdlib", run_dir, preset=preset, overrides={**over, **extra},
                        cache_root=cache / "tokens", progress=False)
            ce = val_ce(load_model(run_dir / "final"), val, name)["mean"]
            rows.setdefault(name, []).append(ce)
            gaps[name].append(ce - control)
            print(f"seed {seed} {name}: CE {ce:.4f} (control {control:.4f}, gap {ce - control:+.4f})", flush=True)
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    print(f"\noriginal val CE {ce_original:.4f}; fine-tuning {steps} steps × {cfg.pretrain.batch_tokens} tokens "
          f"({args.ft_fraction:.0%} of pretraining); seeds {args.seeds}; {time.time() - t0:.0f}s\n")
    print("| method | val CE | LN-free − vanilla |\n|---|---|---|")
    for name, ces in rows.items():
        gap = f"{statistics.mean(gaps[name]):+.4f} ± {sd(gaps[name]):.4f}" if name in gaps else "—"
        print(f"| {name} | {statistics.mean(ces):.4f} ± {sd(ces):.4f} | {gap} |")
    (args.out / "analog_bench.json").write_text(json.dumps({"ce": rows, "gaps": gaps, "original": ce_original}))


if __name__ == "__main__":
    main()
