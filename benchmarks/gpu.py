"""GPU training throughput and MFU: lnfree's removal step against `transformers`' step, at GPT-2's sizes.

Random weights (no download), bf16 autocast with fp32 master weights, ctx 1024, `torch.compile`d, fused AdamW, grad
clip 1.0, dropout 0.1 (the presets'). For each shape, one after the other (each model alone on the card):

  removal       lnfree's step mid-removal (`lnfree.run.step.Stepper`, what `lnfree remove --compile` runs): the
                `lnfree` preset's schedule where half the sites are frozen, position-0 / EOT specials on, aux loss on, σ̂
                statistics collected (per-call EMA). Compiled once for every site state (`set_static_graph`).
  plain         lnfree's vanilla-control step (every LayerNorm live, no statistics, no aux loss)
  transformers  `torch.compile(GPT2LMHeadModel)` (SDPA attention), `model(idx, labels=idx).loss.backward()`, clip,
                `AdamW(fused=True)`; gradient checkpointing when asked

Printed per variant: tokens/s (median of the timed steps, spread), MFU = tokens/s × (6N + 12·L·d·T) / the card's
dense bf16 peak (N: parameters doing matmuls — every one but the position embeddings; the tied embedding counts
once, as the head), peak memory, the compile (first step) time, and the time `baroni2025`'s schedule for that size
would take at this speed. Results go to benchmarks/RESULTS.md with the card named.

    python benchmarks/gpu.py                                      # small, medium, xl on the visible card
    python benchmarks/gpu.py --shapes xl --step-tokens 524288 --activation-checkpointing   # XL, 0.5M-token step
    python benchmarks/gpu.py --shapes small --micro-batch 32 --steps 10
    python benchmarks/gpu.py --device cpu --shapes tiny --no-compile --steps 2   # dry run of the script on CPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import build_hf, ours_from, sync, token_batch  # noqa: E402

SHAPES = {  # name: (n_layer, n_embd, n_head, default micro-batch at ctx 1024)
    "tiny": (2, 64, 2, 2),  # the CPU dry run
    "small": (12, 768, 12, 16),
    "medium": (24, 1024, 16, 8),
    "large": (36, 1280, 20, 8),
    "xl": (48, 1600, 25, 4),
}
PEAK_BF16_TFLOPS = (  # dense (no sparsity) bf16 tensor-core peak by device name, first match wins
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("H800", 989.4),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("V100", 125.0),
)


def peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"{override:g} TFLOP/s (given)"
    if not device.startswith("cuda"):
        return None, "no peak known for a CPU: MFU not computed"
    name = torch.cuda.get_device_name(torch.device(device))
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"{tflops:g} TFLOP/s dense bf16 ({name})"
    return None, f"unknown card {name!r}: pass --peak-tflops for MFU"


def flops_per_token(n_layer: int, d: int, vocab: int, ctx: int) -> float:
    """6N + 12·L·d·T: N the matmul parameters (blocks and the head), the attention scores and mixing on top."""
    block = 12 * d * d + 13 * d  # c_attn, c_proj, c_fc, c_proj weights and biases, two LayerNorms
    n = n_layer * block + vocab * d + 2 * d
    return 6 * n + 12 * n_layer * d * ctx


def step_variants(shape: str, args, device: str):
    """(name, build) pairs: build() returns (step_fn(step, batch), model_to_free)."""
    from lnfree.run.recipes import get_recipe, recipe_schedule
    from lnfree.run.step import Stepper

    n_layer, d, heads, micro = SHAPES[shape]
    micro = args.micro_batch or micro
    seqs = max(micro, args.step_tokens // args.ctx) if args.step_tokens else micro
    seqs -= seqs % micro

    def removal(control: bool):
        def build():
            from lnfree.method.calibrate import calibrate

            hf = build_hf(n_layer, d, heads, args.vocab, args.ctx, 0.1)
            model = ours_from(hf)
            del hf
            recipe = get_recipe("lnfree", n_layer)
            schedule = recipe_schedule(recipe, model.site_layout())
            half = next(s for s in range(schedule.total_steps)
                        if 2 * sum(st.frozen for st in schedule.state_at(s).values()) >= len(model.norm_sites()))
            cfg = replace(recipe.train, batch_tokens=seqs * args.ctx, micro_batch=micro, ctx=args.ctx,
                          dtype="bf16", compile=not args.no_compile, device=device,
                          activation_checkpointing=args.activation_checkpointing,
                          aux_weight=0.0 if control else recipe.train.aux_weight)
            stepper = Stepper(model, cfg, schedule, mode="control" if control else "lnfree", sigma=recipe.sigma,
                              device=device)
            if not control:
                calibrate(model, [token_batch(micro, args.ctx, args.vocab, 99).to(device)], recipe.sigma)
            stepper.start()
            at = 0 if control else half
            return (lambda step, batch: stepper.run(at, batch)), (model, stepper)
        return build

    def transformers_step():
        hf = build_hf(n_layer, d, heads, args.vocab, args.ctx, 0.1).to(device)
        hf.train()
        if args.activation_checkpointing:
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers ≥ 5
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = hf if args.no_compile else torch.compile(hf)
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, fused=True)
        autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

        def step(_, batch):
            total = torch.zeros((), device=device)
            for idx in batch.split(micro):
                with autocast:
                    loss = model(input_ids=idx, labels=idx).loss
                (loss / (len(batch) // micro)).backward()
                total += loss.detach()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return total.item()
        return step, (hf, opt)

    variants = [("removal", removal(False)), ("plain", removal(True)), ("transformers", transformers_step)]
    return [(n, b) for n, b in variants if n in args.variants], seqs, micro


def measure(name: str, build, seqs: int, args, device: str, flops: float, peak: float | None, baroni_tokens: int):
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = keep = None
    try:
        step, keep = build()
        batches = [token_batch(seqs, args.ctx, args.vocab, seed).to(device) for seed in range(2)]
        sync(device)
        t0 = time.perf_counter()
        for i in range(args.warmup):
            step(i, batches[i % 2])
        sync(device)
        first = time.perf_counter() - t0
        times = []
        for i in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            step(args.warmup + i, batches[i % 2])
            sync(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        print(f"  {name:>12}: out of memory at {seqs}×{args.ctx} tokens/step (micro-batch {args.micro_batch or '-'})")
        return None
    finally:
        step = keep = None  # noqa: F841 - frees the model (and its compiled graphs) before the next variant
        gc.collect()
    tokens = seqs * args.ctx
    rates = [tokens / t for t in times]
    rate = statistics.median(rates)
    mfu = f"{rate * flops / (peak * 1e12):6.1%}" if peak else "   n/a"
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:6.1f} GiB" if device.startswith("cuda") else "      -"
    print(f"  {name:>12}: {rate:12,.0f} tokens/s (spread {min(rates):,.0f}–{max(rates):,.0f})  MFU {mfu}  "
          f"peak memory {mem}  warm-up {first:6.1f} s  baroni2025 at this speed: {baroni_tokens / rate / 60:6.1f} min")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", choices=SHAPES, default=["small", "medium", "xl"])
    ap.add_argument("--variants", nargs="+", default=["removal", "plain", "transformers"])
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--micro-batch", type=int, default=None, help="default: per shape (small 16, medium 8, xl 4)")
    ap.add_argument("--step-tokens", type=int, default=None,
                    help="tokens per optimizer step (gradient accumulation); default one micro-batch")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not in the table")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from lnfree.run.recipes import get_recipe

    torch.backends.cuda.matmul.allow_tf32 = True
    peak, peak_text = peak_tflops(args.device, args.peak_tflops)
    where = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    print(f"# {where}, torch {torch.__version__}; bf16 autocast, ctx {args.ctx}, "
          f"{'eager' if args.no_compile else 'torch.compile'}, fused AdamW, dropout 0.1; peak {peak_text}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per variant"
          + ("; activation checkpointing" if args.activation_checkpointing else ""))
    for shape in args.shapes:
        n_layer, d, heads, _ = SHAPES[shape]
        variants, seqs, micro = step_variants(shape, args, args.device)
        recipe = get_recipe("baroni2025", n_layer)
        baroni_tokens = recipe.train.steps * recipe.train.batch_tokens
        flops = flops_per_token(n_layer, d, args.vocab, args.ctx)
        print(f"{shape}: {n_layer}L×{d}, {seqs}×{args.ctx} = {seqs * args.ctx:,} tokens/step in micro-batches of "
              f"{micro}, {flops / 1e9:.2f} GFLOP/token; baroni2025 ({recipe.name}) reads {baroni_tokens:,} tokens")
        for name, build in variants:
            measure(name, build, seqs, args, args.device, flops, peak, baroni_tokens)


if __name__ == "__main__":
    main()
