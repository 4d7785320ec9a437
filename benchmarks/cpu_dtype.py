"""The removal step on CPU in fp32 against bf16 autocast, side by side in one run (issue 20, item 4).

Models: SmolLM2-135M (the real model, `--models smollm2`; preset lnfree-uniform) and the demo's shipped analog
(`analog`; preset lnfree). Each is timed mid-removal (`lnfree.run.step.Stepper` at the schedule's step where half the
sites are frozen, specials, aux loss and σ̂ statistics on), one micro-batch per step, in interleaved rounds (the
order alternates) so that a busy machine slows both alike. Prints tokens/s medians and the bf16/fp32 ratio paired
within rounds. Whether bf16 keeps the CE gap is `benchmarks/analog.py --dtype bf16` against `--dtype fp32`.
No assertions: a measurement.

    .venv/bin/python benchmarks/cpu_dtype.py [--models smollm2 analog] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from lnfree.data import SequenceSampler, build_token_cache
from lnfree.method.calibrate import calibrate
from lnfree.models import load_model
from lnfree.run.recipes import get_recipe, recipe_schedule
from lnfree.run.step import Stepper, native_bf16_cpu
from lnfree.sources import load_source
from lnfree.tokenizer import load_tokenizer

SETUPS = {  # name: (source, preset, micro-batch, ctx)
    "smollm2": ("smollm2-135m", "lnfree-uniform", 8, 256),
    "analog": (None, "lnfree", 16, 256),
}


def load(name: str):
    source, preset, micro, ctx = SETUPS[name]
    if source is None:
        from lnfree.demo import SHIPPED_ANALOG

        model, folder = load_model(SHIPPED_ANALOG), SHIPPED_ANALOG
    else:
        model, where = load_source(source)
        folder = where.model_dir
    cache = build_token_cache("stdlib", load_tokenizer(folder), split="train", need_tokens=micro * ctx * 16,
                              progress=False)
    sampler = SequenceSampler(cache, ctx, seed=0)
    return model, preset, micro, ctx, [sampler.next_batch(micro) for _ in range(4)]


def bench(name: str, rounds: int) -> tuple[float, float, list[float]]:
    model, preset, micro, ctx, batches = load(name)
    recipe = get_recipe(preset, model.n_layers)
    schedule = recipe_schedule(recipe, model.site_layout())
    half = next(s for s in range(schedule.total_steps)
                if sum(st.frozen for st in schedule.state_at(s).values()) >= len(model.norm_sites()) // 2)
    calibrate(model, batches[:1], recipe.sigma)
    base = replace(recipe.train, batch_tokens=micro * ctx, micro_batch=micro, ctx=ctx, device="cpu")
    steppers = {dtype: Stepper(model, replace(base, dtype=dtype), schedule, sigma=recipe.sigma)
                for dtype in ("fp32", "bf16")}
    steppers["bf16"].optimizer = steppers["fp32"].optimizer  # one AdamW state for the shared model (timing only)
    for stepper in steppers.values():
        stepper.start()
        stepper.run(half, batches[0])  # warm-up: oneDNN primitives, allocator
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(rounds):
        for dtype in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            t0 = time.perf_counter()
            steppers[dtype].run(half, batches[1 + r % 3])
            times[dtype].append(time.perf_counter() - t0)
    tokens = micro * ctx
    ratios = [a / b for a, b in zip(times["fp32"], times["bf16"], strict=True)]
    return tokens / statistics.median(times["fp32"]), tokens / statistics.median(times["bf16"]), ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16_cpu()}")
    print("| model | fp32 tokens/s | bf16 tokens/s | bf16 / fp32 (paired, median [min–max]) |\n|---|---|---|---|")
    for name in args.models:
        fp32, bf16, ratios = bench(name, args.rounds)
        print(f"| {name} ({SETUPS[name][1]}, micro {SETUPS[name][2]} × ctx {SETUPS[name][3]}) | {fp32:,.0f} | "
              f"{bf16:,.0f} | {statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}] |", flush=True)


if __name__ == "__main__":
    main()
