"""Inference throughput: the folded, norm-free model against the same model with its norms, and against
`transformers`' GPT-2, side by side.

One random-weight GPT-2 (built with `transformers`, read with `load_model`) gets σ̂ measured on random tokens and
every LayerNorm frozen without specials — "the model with its norms": each norm still centres, divides by σ̂ and
applies γ, β. `fold()` turns it into the norm-free model computing the same function. Then, for the same model:

  full-sequence forward (no grad, eval), tokens/s over B × T tokens
    lnfree folded          lnfree's own GPT-2, no norm modules (what `lnfree remove` writes to final/)
    lnfree with norms      the same model before folding: every site frozen
    hf export (folded)     `LNFreeGPT2LMHeadModel`, what `lnfree export --format hf` writes (identity norms)
    transformers GPT-2     a stock `GPT2LMHeadModel` with its LayerNorms computing the same function (the
                           `hf-compat` export: eps = 1e12, gains × 1e6)
  KV-cached greedy decode through `generate` (batch 1 unless --decode-batch), new tokens/s
    hf export (folded)     vs   transformers GPT-2 (with its norms)

Interleaved rounds (the order rotates), median and spread of each, ratios paired within rounds; the logits of
every variant are checked against the folded model's first. No assertions: this is a measurement.

    .venv/bin/python benchmarks/inference.py                          # GPT-2 small shape, CPU
    .venv/bin/python benchmarks/inference.py --shape analog --vocab 4096    # the offline demo's analog shape
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import SHAPES, build_pair, sync, token_batch  # noqa: E402


@torch.no_grad()
def build_models(n_layer: int, n_embd: int, n_head: int, vocab: int, device: str) -> dict:
    """The four models, all computing the same function."""
    import lnfree.export  # noqa: F401 - registers the LNFree* classes with transformers' Auto classes
    from lnfree.method.calibrate import apply_site_states, calibrate
    from lnfree.method.schedule import SiteState
    from lnfree.models.gpt2_hf import to_compat_hf, to_hf_model

    with_norms, _ = build_pair(n_layer, n_embd, n_head, vocab, 1024, 0.0, "cpu")
    calibrate(with_norms, [token_batch(4, 128, vocab, seed) for seed in range(2)])
    apply_site_states(with_norms, {n: SiteState(True, 0.0, 0.0) for n in with_norms.norm_sites()})
    folded = with_norms.fold()
    models = {"lnfree folded": folded, "lnfree with norms": with_norms, "hf export (folded)": to_hf_model(folded),
              "transformers GPT-2": to_compat_hf(folded)}
    return {name: m.to(device).eval() for name, m in models.items()}


def logits(model, idx: torch.Tensor) -> torch.Tensor:
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def rounds(fns: dict, n_rounds: int, device: str) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(n_rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def show(title: str, times: dict, units: int, pairs: list[tuple[str, str]]) -> None:
    print(title)
    for name, ts in times.items():
        rates = [units / t for t in ts]
        print(f"  {name:>22}: {statistics.median(rates):12,.0f} tokens/s  (spread {min(rates):,.0f}–{max(rates):,.0f})")
    for a, b in pairs:
        r = [tb / ta for ta, tb in zip(times[a], times[b], strict=True)]
        print(f"  ratio {a} / {b}: {statistics.median(r):.3f}  [{min(r):.3f}–{max(r):.3f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=4, help="full forward: sequences")
    ap.add_argument("--ctx", type=int, default=256, help="full forward: tokens per sequence")
    ap.add_argument("--prompt", type=int, default=32, help="decode: prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode: tokens generated")
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    n_layer, n_embd, n_head = SHAPES[args.shape]
    n_layer = args.layers or n_layer
    models = build_models(n_layer, n_embd, n_head, args.vocab, args.device)
    idx = token_batch(args.batch, args.ctx, args.vocab, 7).to(args.device)
    with torch.no_grad():
        reference = logits(models["lnfree folded"], idx)
        agree = {name: (logits(m, idx) - reference).abs().max().item() for name, m in models.items()}
    print(f"# GPT-2 {n_layer}L×{n_embd} ({n_head} heads, vocab {args.vocab}), fp32 on {args.device} "
          f"({torch.get_num_threads()} threads), {args.rounds} interleaved rounds; max |Δ logits| vs the folded model: "
          + ", ".join(f"{k} {v:.1e}" for k, v in agree.items() if k != "lnfree folded"))

    def forward(model):
        return lambda: torch.no_grad()(logits)(model, idx)

    times = rounds({name: forward(m) for name, m in models.items()}, args.rounds, args.device)
    show(f"full-sequence forward, {args.batch}×{args.ctx} tokens:", times, args.batch * args.ctx,
         [("lnfree folded", "lnfree with norms"), ("hf export (folded)", "transformers GPT-2"),
          ("lnfree folded", "transformers GPT-2")])

    prompt = token_batch(args.decode_batch, args.prompt, args.vocab - 1, 11).to(args.device)
    outputs = {}

    def decode(name):
        def run():
            out = models[name].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                        min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                                        pad_token_id=args.vocab - 1)
            outputs[name] = out
        return run

    times = rounds({name: decode(name) for name in ("hf export (folded)", "transformers GPT-2")}, args.rounds,
                   args.device)
    same = torch.equal(outputs["hf export (folded)"], outputs["transformers GPT-2"])
    show(f"KV-cached greedy decode through generate, batch {args.decode_batch}, prompt {args.prompt}, "
         f"{args.new_tokens} new tokens (same tokens generated: {same}):", times,
         args.decode_batch * args.new_tokens, [("hf export (folded)", "transformers GPT-2")])


if __name__ == "__main__":
    main()
