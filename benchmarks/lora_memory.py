"""What a removal run must hold in memory, full fine-tuning against `--lora R`: parameters counted on the real
module trees (lnfree's own GPT-2 and Llama families, built on the meta device, adapters put in by peft exactly as
`lnfree remove --lora` does), bytes by arithmetic. Prints a Markdown table and which card each fits.

    .venv/bin/python benchmarks/lora_memory.py [--ranks 16 64 256]
    .venv/bin/python benchmarks/lora_memory.py --measure smollm2-135m [--micro-batches 1 8] [--ranks 64]

`--measure SOURCE` instead starts removals of SOURCE side by side, each in a fresh process (the 400-step run of
2,048 stdlib tokens per step at ctx 256, stopped after its first 8 steps: a schedule compressed into a few steps
diverges on a real model), full fine-tuning and each rank at each micro-batch, and prints the run's own peak memory
(`peak_mem_gib` in metrics.jsonl: CUDA's allocator peak, or on CPU the peak resident set from the run's start)
and its speed, with LoRA over full fine-tuning as ratios.

Training state per parameter, as lnfree trains (fp32 master weights, AdamW, bf16 autocast only for the matmuls):
weights 4 bytes for every parameter; for every trainable one also its gradient (4) and AdamW's two moments (8).
Activations come on top and scale with micro-batch × ctx (activation checkpointing keeps one block's); the
table leaves a quarter of the card for them, a rough budget, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, LlamaConfig

from lnfree.models import FAMILIES
from lnfree.run.lora import add_adapters, count_trainable

MODELS = {
    "gpt2 (small, 124M)": ("gpt2", GPT2Config(n_layer=12, n_embd=768, n_head=12)),
    "gpt2-medium (355M)": ("gpt2", GPT2Config(n_layer=24, n_embd=1024, n_head=16)),
    "gpt2-large (774M)": ("gpt2", GPT2Config(n_layer=36, n_embd=1280, n_head=20)),
    "gpt2-xl (1.5B)": ("gpt2", GPT2Config(n_layer=48, n_embd=1600, n_head=25)),
    "SmolLM2-135M": ("llama", LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                          tie_word_embeddings=True, max_position_embeddings=8192)),
    "Llama-3.2-1B": ("llama", LlamaConfig(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                          tie_word_embeddings=True, head_dim=64, max_position_embeddings=131072)),
}
CARDS_GB = (24, 80)


def state_bytes(total: int, trainable: int) -> int:
    return 4 * total + 16 * trainable


def build(family: str, config) -> torch.nn.Module:
    hf = config.to_dict()
    hf["architectures"] = ["GPT2LMHeadModel" if family == "gpt2" else "LlamaForCausalLM"]
    with torch.device("meta"):
        return FAMILIES[family].build(hf)


def measured(source: str, micro_batch: int, rank: int | None, folder: Path, steps: int = 8) -> tuple[float, float]:
    """(peak GiB, median tokens/s after the first step) over the first ``steps`` steps of a removal of ``source``
    in a fresh process."""
    out = folder / f"mb{micro_batch}-{rank or 'full'}"
    lora = ["--lora", str(rank)] if rank else []
    run = subprocess.Popen([sys.executable, "-m", "lnfree.cli", "remove", source, "--data", "stdlib", "--steps", "400",
                            "--batch-tokens", "2048", "--micro-batch", str(micro_batch), "--ctx", "256", "--dtype",
                            "auto", "--quiet", "--out", str(out), *lora], stdout=subprocess.DEVNULL)
    metrics, lines = out / "metrics.jsonl", []
    while run.poll() is None and len(lines) < steps:
        time.sleep(1)
        lines = metrics.read_text().splitlines() if metrics.exists() else []
    run.kill()
    run.wait()
    if len(lines) < steps:
        raise SystemExit(f"the run in {out} stopped after {len(lines)} steps")
    records = [json.loads(line) for line in lines[:steps]]
    return max(r["peak_mem_gib"] for r in records), statistics.median(r["tokens_per_s"] for r in records[1:])


def measure(source: str, micro_batches: list[int], ranks: list[int]) -> None:
    print(f"| {source} | micro-batch | peak memory | tokens/s | peak / full FT's | speed / full FT's |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for micro_batch in micro_batches:
            full = measured(source, micro_batch, None, Path(tmp))
            for rank in [None, *ranks]:
                peak, speed = full if rank is None else measured(source, micro_batch, rank, Path(tmp))
                print(f"| {'full FT' if rank is None else f'LoRA r{rank}'} | {micro_batch} | {peak:.2f} GiB | "
                      f"{speed:,.0f} | {peak / full[0]:.2f} | {speed / full[1]:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--measure", metavar="SOURCE", help="measure short removal runs of this model instead")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    if args.measure:
        return measure(args.measure, args.micro_batches, args.ranks)
    head = " | ".join(f"LoRA r{r}: trainable / state" for r in args.ranks)
    print(f"| model | parameters | full FT state | {head} | fits {' / '.join(f'{c} GB' for c in CARDS_GB)} "
          "(full FT; LoRA r64) |")
    print("|---" * (4 + len(args.ranks)) + "|")
    for name, (family, config) in MODELS.items():
        total = count_trainable(build(family, config))[1]
        cells, lora64 = [], None
        for rank in args.ranks:
            model = build(family, config)
            add_adapters(model, rank, None, "all", "norms", 0)
            trainable, with_adapters = count_trainable(model)
            state = state_bytes(with_adapters, trainable)
            lora64 = state if rank == 64 else lora64
            cells.append(f"{trainable / 1e6:.1f}M / {state / 2**30:.1f} GiB")
        full = state_bytes(total, total)
        fits = lambda b: "/".join("yes" if b < 0.75 * c * 1e9 else "no" for c in CARDS_GB)
        print(f"| {name} | {total / 1e6:.0f}M | {full / 2**30:.1f} GiB | {' | '.join(cells)} | "
              f"{fits(full)}; {fits(lora64) if lora64 else '–'} |")


if __name__ == "__main__":
    main()
