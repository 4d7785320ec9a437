"""What a removal run must hold in memory, full fine-tuning against `--lora R`: parameters counted on the real
module trees (lnfree's own GPT-2 and Llama families, built on the meta device, adapters put in by peft exactly as
`lnfree remove --lora` does), bytes by arithmetic. Prints a Markdown table and which card each fits.

    .venv/bin/python benchmarks/lora_memory.py [--ranks 16 64 256]

Training state per parameter, as lnfree trains (fp32 master weights, AdamW, bf16 autocast only for the matmuls):
weights 4 bytes for every parameter; for every trainable one also its gradient (4) and AdamW's two moments (8).
Activations come on top and scale with micro-batch × ctx (activation checkpointing keeps one block's); the
table leaves a quarter of the card for them, a rough budget, not a measurement.
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
    args = ap.parse_args()
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
