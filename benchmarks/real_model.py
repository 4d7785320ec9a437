"""A real pretrained model before and after norm removal (issue 20: SmolLM2-135M from its GGUF wheel).

    warm     — every norm live, CE + the uniformity loss only (lnfree-uniform's warm phase): position-0 ratio and
               held-out CE as the massive activations shrink
    profile  — the original: held-out CE, position 0's residual norm over the median token's per block, the cost of
               freezing every site at once (no fine-tuning; common σ̂, with position-0 / EOT specials, and with
               lnfree-uniform's outlier special at full weight), and a
               sensitivity map: each site frozen alone at its calibrated σ̂, ΔCE (figure: sensitivity.png)
    cliff    — a removal run's checkpoint in its scheduled state: held-out CE as every frozen site's special is
               turned down (weights 1 → 0) and with the outlier cap raised (k = 2, 4, 8), position 0's ratio, and at
               a chosen weight the largest token norms per block — where a token runs away through frozen blocks
    branch   — a new run folder that continues a removal run from one of its checkpoints with another ease-out of
               the outlier specials (`--bos-ramp`, `--bos-power`, ending `--tail` steps before the run's end, or each
               site's `--bos-lag` steps after its own freeze): the
               checkpoint, metrics up to it and run.json are copied, the schedule in run.json edited; then
               `lnfree remove ... --resume --out BRANCH` (the run's own command) trains it, so ease-out variants
               start from one trained state instead of each costing a whole run
    equalize-embeddings — a transformers folder of the model with its head untied and every input-embedding row
               at one RMS (the median row's), to remove from instead of the original
    table    — run folders side by side with the original: CE of original / control / norm-free on held-out text,
               gap, fraction of the freeze-all cost recovered (measured here: plain freeze-all, or with the outlier
               special where plain is not finite), tokens, wall time, and the position-0 ratio per block before
               and after (figure: position0.png); Markdown rows for RESULTS.md

    .venv/bin/python benchmarks/real_model.py profile smollm2-135m --out results/smollm2
    .venv/bin/python benchmarks/real_model.py table smollm2-135m RUN... --control RUN_CONTROL --out results/smollm2
    .venv/bin/python benchmarks/real_model.py warm smollm2-135m --tokens 2048 --steps 50
    .venv/bin/python benchmarks/real_model.py cliff smollm2-135m runs/smollm2/RUN/checkpoints/step_00000250
    .venv/bin/python benchmarks/real_model.py branch runs/smollm2/RUN 250 runs/smollm2/BRANCH --bos-ramp 40
    .venv/bin/python benchmarks/real_model.py equalize-embeddings smollm2-135m runs/smollm2/eq-source

No assertions: this is a measurement. CE uses `lnfree eval`'s protocol (stdlib-val, fp32, no BOS).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lnfree.analysis.eval_data import load_eval_data
from lnfree.analysis.evaluate import evaluate_ce
from lnfree.data import SequenceSampler, build_token_cache
from lnfree.demo_real import position0_ratio
from lnfree.jsonfile import read_jsonl
from lnfree.method.aux import PER_NORM_KINDS
from lnfree.method.calibrate import apply_site_states, calibrate
from lnfree.method.model_sites import set_sigma_rule, uniformity_terms
from lnfree.method.schedule import SiteState
from lnfree.method.sigma import SigmaRule
from lnfree.run.record import RunRecord
from lnfree.sources import load_source
from lnfree.tokenizer import load_tokenizer


def val_batches(tokenizer, ctx: int, tokens: int, batch: int = 8) -> list[torch.Tensor]:
    cache = load_eval_data("stdlib-val", tokenizer)
    out = []
    for b in SequenceSampler(cache, ctx, shuffle=False).iter_batches(batch):
        out.append(b)
        if len(out) * batch * ctx >= tokens:
            break
    return out


def ce(model, batches) -> float:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate_ce(model, batches, dtype="fp32", progress=False).mean


def calibration_sampler(tokenizer, ctx: int) -> SequenceSampler:
    train = build_token_cache("stdlib", tokenizer, split="train", need_tokens=ctx * 64, progress=False)
    return SequenceSampler(train, ctx, seed=1)


def freeze_all_costs(model, calibration: SequenceSampler, batches) -> dict[str, float]:
    """CE with every site frozen at once at a calibrated σ̂, no fine-tuning: plain, with position-0 / EOT specials,
    and with lnfree-uniform's outlier special at full weight (its state when the last site freezes). Leaves the
    model live, calibrated with position 0 / EOT apart."""
    sites = model.norm_sites()
    calibrate(model, [calibration.next_batch(8) for _ in range(4)], SigmaRule(positions="apart"))
    costs = {}
    for label, special in (("freeze_all", 0.0), ("freeze_all_specials", 1.0)):
        apply_site_states(model, {n: SiteState(True, special, special) for n in sites})
        costs[label] = ce(model, batches)
    apply_site_states(model, {n: SiteState(False, 0, 0) for n in sites})
    outlier_rule = SigmaRule(statistic="geo_std", positions="apart", special="outlier")
    calibrate(model, [calibration.next_batch(8) for _ in range(4)], outlier_rule)  # lnfree-uniform's rule
    apply_site_states(model, {n: SiteState(True, 1.0, 0.0) for n in sites})
    costs["freeze_all_outlier_special"] = ce(model, batches)
    apply_site_states(model, {n: SiteState(False, 0, 0) for n in sites})
    calibrate(model, [calibration.next_batch(8) for _ in range(4)], SigmaRule(positions="apart"))
    return costs


def profile(args) -> None:
    model, where = load_source(args.model)
    tokenizer = load_tokenizer(where.model_dir)
    batches = val_batches(tokenizer, args.ctx, args.tokens)
    sites = model.norm_sites()
    live = {n: SiteState(False, 0, 0) for n in sites}
    t0 = time.time()
    base = ce(model, batches)
    result = {"model": args.model, "gguf": where.gguf, "ctx": args.ctx, "tokens": args.tokens, "ce": base,
              "position0_ratio": position0_ratio(model, batches[0]),
              **freeze_all_costs(model, calibration_sampler(tokenizer, args.ctx), batches)}
    delta = {}
    for name in sites:
        apply_site_states(model, {**live, name: SiteState(True, 0.0, 0.0)})
        delta[name] = ce(model, batches) - base
        print(f"{name:<20} ΔCE {delta[name]:+.4f}", flush=True)
    apply_site_states(model, live)
    result["sensitivity"] = delta
    result["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=1))
    plot_sensitivity(delta, model.n_layers, out / "sensitivity.png", args.model)
    print(json.dumps({k: v for k, v in result.items() if k != "sensitivity"}, indent=1))


def warm(args) -> None:
    """Every norm live, CE + weight × the "sites" uniformity loss (lnfree-uniform's warm phase, on its own): how fast
    the massive activations shrink and what it costs. Prints held-out CE and position 0's ratio per block."""
    from lnfree.run.step import next_token_loss

    model, where = load_source(args.model)
    tokenizer = load_tokenizer(where.model_dir)
    batches = val_batches(tokenizer, args.ctx, args.tokens)
    train = build_token_cache("stdlib", tokenizer, split="train", need_tokens=args.ctx * 8 * (args.steps + 10),
                              progress=False)
    sampler = SequenceSampler(train, args.ctx, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def report(step: int) -> None:
        ratios = " ".join(f"{x:.0f}" for x in position0_ratio(model, batches[0]))
        print(f"step {step}: held-out CE {ce(model, batches):.4f}; position-0 ratio per block {ratios}", flush=True)

    report(0)
    for step in range(1, args.steps + 1):
        model.train()
        for idx in sampler.next_batch(8).split(4):
            with torch.autocast("cpu", dtype=torch.bfloat16), uniformity_terms(model, args.aux_kind) as terms:
                loss = next_token_loss(model(idx), idx)
            ((loss + args.weight * torch.stack(terms).mean()) / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.every == 0:
            report(step)


def cliff(args) -> None:
    """What a run's specials hide at one checkpoint (see the module docstring)."""
    from dataclasses import replace

    from lnfree.jsonfile import read_json
    from lnfree.run.checkpoint import load_checkpoint

    _, where = load_source(args.model)
    batches = val_batches(load_tokenizer(where.model_dir), args.ctx, args.tokens)
    checkpoint = Path(args.checkpoint)
    model, _ = load_checkpoint(checkpoint)
    state = read_json(checkpoint / "state.json")
    record = RunRecord.read(checkpoint.parent.parent)
    rule = record.sigma
    scheduled = record.schedule.state_at(state["step"])

    def at(weight: float, factor: float | None = None) -> None:
        set_sigma_rule(model, rule if factor is None else replace(rule, outlier_factor=factor))
        apply_site_states(model, {n: SiteState(s.frozen, min(s.bos_weight, weight) if s.frozen else 0.0, 0.0)
                                  for n, s in scheduled.items()})

    at(1.0)
    frozen = sum(s.frozen for s in scheduled.values())
    ratios = " ".join(f"{x:.1f}" for x in position0_ratio(model, batches[0]))
    print(f"step {state['step']}, {frozen}/{len(scheduled)} sites frozen; position-0 ratio per block {ratios}")
    for weight in (1.0, 0.75, 0.5, 0.25, 0.0):
        at(weight)
        print(f"specials at weight ≤ {weight}: held-out CE {ce(model, batches):.4f}", flush=True)
    if rule.special == "outlier":
        for factor in (2.0, 4.0, 8.0):
            at(1.0, factor)
            print(f"outlier cap at k = {factor:g} (weight 1): held-out CE {ce(model, batches):.4f}", flush=True)
    at(args.weight)
    cache: dict = {}
    with torch.no_grad():
        model.eval()(batches[0], cache=cache)
    print(f"specials at weight {args.weight}: the largest token norms over the median, per block (batch, position)")
    for i in range(model.n_layers):
        norms = cache[f"blocks.{i}.hook_resid_pre"].float().norm(dim=-1)
        top = (norms / norms.median()).flatten().topk(3)
        found = zip(top.values.tolist(), (divmod(j, norms.shape[1]) for j in top.indices.tolist()), strict=True)
        print(f"block {i:>2}: " + ", ".join(f"{v:.3g} at {w}" for v, w in found))


def plot_sensitivity(delta: dict[str, float], n_layers: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = ["ln1.qk", "ln1.v", "ln2"]
    grid = np.full((len(rows), n_layers), np.nan)
    for r, kind in enumerate(rows):
        for i in range(n_layers):
            grid[r, i] = delta.get(f"blocks.{i}.{kind}", np.nan)
    fig, ax = plt.subplots(figsize=(max(8, n_layers * 0.35), 2.6))
    shown = np.sign(grid) * np.log10(1 + np.abs(grid) / 0.01)  # log scale: 0.01 nats to 10+ nats in one picture
    im = ax.imshow(shown, aspect="auto", cmap="magma_r")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7)
    ax.set_xlabel("block")
    final = delta.get("ln_final", float("nan"))
    ax.set_title(f"{title}: ΔCE (nats) with one site frozen alone at its σ̂; ln_final {final:+.2f}", fontsize=9)
    for r in range(len(rows)):
        for i in range(n_layers):
            v = grid[r, i]
            if math.isfinite(v) and abs(v) >= 0.1:
                ax.text(i, r, f"{v:.1f}", ha="center", va="center", fontsize=5.5, color="white")
    cbar = fig.colorbar(im, ax=ax, fraction=0.03)
    cbar.set_label("sign · log10(1 + |ΔCE|/0.01)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _run_facts(run: Path) -> dict:
    record = RunRecord.read(run)
    metrics = read_jsonl(run / "metrics.jsonl")
    seconds = sum(m["tokens"] / len(metrics) / m["tokens_per_s"] for m in metrics) if metrics else float("nan")
    tokens = metrics[-1]["tokens"] if metrics else 0
    return {"preset": record.preset, "seed": record.train.seed, "steps": record.train.steps,
            "tokens": tokens, "train_seconds": seconds, "mode": record.mode}


def table(args) -> None:
    original, where = load_source(args.model)
    tokenizer = load_tokenizer(where.model_dir)
    batches = val_batches(tokenizer, args.ctx, args.tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ce(original, batches)
    control_ce = ce(load_source(args.control)[0], batches) if args.control else float("nan")
    ratios = {"original": position0_ratio(original, batches[0])}
    costs = freeze_all_costs(original, calibration_sampler(tokenizer, args.ctx), batches)
    # the no-fine-tuning cost: every site frozen at once — plain if finite, else with the outlier special on
    cost_label = next(k for k in ("freeze_all", "freeze_all_outlier_special")
                      if math.isfinite(costs[k]) or k == "freeze_all_outlier_special")
    cost = costs[cost_label] - base
    rows = []
    for run in args.runs:
        model = load_source(run)[0]
        facts = _run_facts(Path(run))
        value = ce(model, batches)
        ratios[Path(run).name] = position0_ratio(model, batches[0])
        recovered = 1 - (value - control_ce) / cost if math.isfinite(cost) else float("nan")
        rows.append({**facts, "run": str(run), "ce_original": base, "ce_control": control_ce, "ce_lnfree": value,
                     "gap": value - control_ce, "recovered": recovered})
    (out / "table.json").write_text(json.dumps({"rows": rows, "position0_ratio": ratios, "freeze_all": costs,
                                                "recovered_of": cost_label}, indent=1))
    print(f"freeze-all, no fine-tuning: {', '.join(f'{k} {v:.4f}' for k, v in costs.items())} (original {base:.4f}); "
          f"recovered = 1 − gap / ({cost_label} − original)")
    print("| model | preset | seed | tokens | wall (train) | CE original | CE control | CE norm-free | gap | "
          "recovered |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rec = f"{r['recovered']:.1%}" if math.isfinite(r["recovered"]) else "n/a (freeze-all diverges)"
        print(f"| {args.model} | {r['preset']} | {r['seed']} | {r['tokens']:,} | {r['train_seconds'] / 60:.0f} min | "
              f"{r['ce_original']:.4f} | {r['ce_control']:.4f} | {r['ce_lnfree']:.4f} | {r['gap']:+.4f} | {rec} |")
    plot_position0(ratios, out / "position0.png", args.model)


def plot_position0(ratios: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, values in ratios.items():
        ax.plot(range(len(values)), values, marker="o", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("block (resid_pre)")
    ax.set_ylabel("‖x₀‖ / median ‖x_t‖")
    ax.set_title(f"{title}: position 0's residual norm over the median token's", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def branch(args) -> None:
    import shutil

    run, out = Path(args.run), Path(args.branch_out)
    checkpoint = run / "checkpoints" / f"step_{args.step:08d}"
    if not checkpoint.is_dir():
        raise SystemExit(f"{run} has no checkpoint at step {args.step}")
    if out.exists():
        raise SystemExit(f"{out} exists; pick a new folder")
    record = json.loads((run / "run.json").read_text())
    schedule = record["schedule"]
    if args.bos_lag is None:  # every site's special together, ending `tail` steps before the run's end
        offs = {site: schedule["total_steps"] - args.tail for site in schedule["bos_off"]}
        how = f"every site's special eased over {args.bos_ramp} steps to step {min(offs.values())}"
    else:  # each site's special on its own, ending `bos_lag` steps after that site froze
        offs = {site: schedule["freeze_at"][site] + args.bos_lag for site in schedule["bos_off"]}
        how = f"each site's special eased over {args.bos_ramp} steps to {args.bos_lag} steps after its freeze"
    if min(offs.values()) - args.bos_ramp < args.step - 1:
        raise SystemExit(f"an ease of {args.bos_ramp} steps ending at step {min(offs.values())} starts before the "
                         "checkpoint")
    if max(offs.values()) >= schedule["total_steps"]:
        raise SystemExit(f"the last special would go at step {max(offs.values())}, past the run's end")
    schedule.update(bos_off=offs, bos_ramp=args.bos_ramp, bos_power=args.bos_power)
    schedule["notes"] = [*schedule.get("notes", []), f"branched from {run} at step {args.step} "
                         f"(benchmarks/real_model.py branch): {how}"]
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] < args.step))
    print(f"{out}: from step {args.step} of {run}; {how}, power {args.bos_power}, the last at step "
          f"{max(offs.values())}; continue it with the run's own command plus --resume --out {out}")


def equalize_embeddings(args) -> None:
    """A transformers folder of the model with its head untied (kept as the original embedding) and every input-
    embedding row scaled to the median row's RMS: block 0's norm reads only an embedding's direction, so with every
    norm live this barely moves the model, while in the norm-free model no token starts above the rest because of
    its own embedding (RESULTS: a rare token that runs away)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, where = load_source(args.model)
    out = Path(args.equalized_out)
    if out.exists():
        raise SystemExit(f"{out} exists; pick a new folder")
    model = AutoModelForCausalLM.from_pretrained(where.model_dir, dtype=torch.float32)
    embedding = model.get_input_embeddings().weight.detach().clone()
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(embedding.shape[1], embedding.shape[0], bias=False)
    head.weight = torch.nn.Parameter(embedding.clone())
    model.set_output_embeddings(head)
    rms = embedding.pow(2).mean(-1, keepdim=True).sqrt()  # (V, 1)
    model.get_input_embeddings().weight = torch.nn.Parameter(embedding * (rms.median() / rms))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(where.model_dir).save_pretrained(out)
    print(f"{out}: head untied, every input row at RMS {rms.median().item():.4f} (rows were "
          f"{rms.min().item():.4f}–{rms.max().item():.4f}); use it as the model of `lnfree remove`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("profile")
    p.add_argument("model")
    p.set_defaults(func=profile)
    t = sub.add_parser("table")
    t.add_argument("model")
    t.add_argument("runs", nargs="+")
    t.add_argument("--control")
    t.set_defaults(func=table)
    w = sub.add_parser("warm")
    w.add_argument("model")
    w.add_argument("--weight", type=float, default=10.0)
    w.add_argument("--steps", type=int, default=50)
    w.add_argument("--every", type=int, default=25)
    w.add_argument("--lr", type=float, default=1e-4)
    w.add_argument("--aux-kind", default="sites", choices=PER_NORM_KINDS)
    w.set_defaults(func=warm)
    c = sub.add_parser("cliff")
    c.add_argument("model")
    c.add_argument("checkpoint", help="a removal run's checkpoints/step_N folder")
    c.add_argument("--weight", type=float, default=0.25, help="special weight at which token norms are traced")
    c.set_defaults(func=cliff)
    b = sub.add_parser("branch")
    b.add_argument("run")
    b.add_argument("step", type=int, help="the checkpoint step to branch from")
    b.add_argument("branch_out")
    b.add_argument("--bos-ramp", type=int, required=True, help="ease the outlier specials out over this many steps")
    b.add_argument("--bos-power", type=float, default=2.0, help="weight (steps left / ramp) ** power")
    b.add_argument("--tail", type=int, default=36, help="steps at weight 0 before the run's end")
    b.add_argument("--bos-lag", type=int, help="ease each site's special out on its own, ending this many steps after "
                   "that site froze (RemovalSpec.bos_lag), instead of every site's together before --tail")
    b.set_defaults(func=branch)
    e = sub.add_parser("equalize-embeddings")
    e.add_argument("model")
    e.add_argument("equalized_out", help="the new transformers folder")
    e.set_defaults(func=equalize_embeddings)
    for q in (p, t, w, c):
        q.add_argument("--out", default="results/real-model")
        q.add_argument("--ctx", type=int, default=256)
        q.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
