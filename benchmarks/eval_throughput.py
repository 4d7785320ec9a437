"""Eval throughput: `lnfree.analysis.evaluate.evaluate_ce` vs a plain `transformers` forward loop, side by side.

Both score the same random-weight GPT-2 (built with `transformers`, read into our model with `load_model`) on
the same token batches; tokens/s counts next-token predictions, B × (ctx − 1) per batch. The `transformers`
loop is what one would write by hand: `model(idx, labels=idx).loss` per batch. Ours also keeps every
per-token loss and computes the distribution statistics. No assertions on speed: it prints the ratio.

    .venv/bin/python benchmarks/eval_throughput.py                 # a mid-size GPT-2, CPU-friendly
    .venv/bin/python benchmarks/eval_throughput.py --size small --ctx 1024 --batch-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

SIZES = {  # name: (n_layer, n_embd, n_head)
    "mini": (6, 384, 6),
    "small": (12, 768, 12),  # GPT-2 small
}


def build_models(size: str, ctx: int, device: str):
    import transformers

    from lnfree.models import load_model

    transformers.logging.set_verbosity_error()  # its loss_type notice is noise here
    n_layer, n_embd, n_head = SIZES[size]
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=max(ctx, 1024))
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_model(tmp)
    return ours.to(device).eval(), hf.to(device)


def time_it(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    from lnfree.analysis.evaluate import evaluate_ce

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="mini")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each is reported")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    ours, hf = build_models(args.size, args.ctx, args.device)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, hf.config.vocab_size, (args.batch_size, args.ctx), generator=gen)
               for _ in range(args.batches)]
    n_tokens = args.batches * args.batch_size * (args.ctx - 1)

    @torch.no_grad()
    def hf_loop() -> float:
        losses = [hf(idx.to(args.device), labels=idx.to(args.device)).loss for idx in batches]
        return torch.stack(losses).mean().item()

    ours_loop = lambda: evaluate_ce(ours, batches, progress=False)
    hf_loop(), ours_loop()  # warm-up (allocator, kernels)
    best = {"lnfree": float("inf"), "transformers": float("inf")}
    for _ in range(args.rounds):
        best["lnfree"] = min(best["lnfree"], time_it(ours_loop, args.device))
        best["transformers"] = min(best["transformers"], time_it(hf_loop, args.device))
    ce_ours, ce_hf = ours_loop().mean, hf_loop()

    threads = torch.get_num_threads()
    print(f"# GPT-2 {args.size}, {args.batches} batches of {args.batch_size}×{args.ctx} on {args.device} "
          f"({threads} threads), fp32; {n_tokens:,} predictions per pass, best of {args.rounds}")
    for name, seconds in best.items():
        print(f"{name:>12}: {n_tokens / seconds:12,.0f} tokens/s  ({seconds:.3f} s)")
    print(f"ratio lnfree / transformers: {best['transformers'] / best['lnfree']:.3f}  "
          f"(CE {ce_ours:.6f} vs {ce_hf:.6f}, |Δ| {abs(ce_ours - ce_hf):.1e})")


if __name__ == "__main__":
    main()
