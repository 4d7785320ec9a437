"""Training-step throughput: lnfree's removal step against `transformers`' own GPT-2 step, side by side.

Both train the same random-weight GPT-2 (built with `transformers`, read into lnfree with `load_model`) on the same
token batches. Variants, timed in interleaved rounds (the order rotates every round) so that a busy machine slows
them alike:

  removal      lnfree's step mid-removal (`lnfree.run.step.Stepper`, what `lnfree remove` runs): the `lnfree` preset's
               schedule at the step where half the sites are frozen, position-0 / EOT specials on at the frozen
               ones, the auxiliary loss on, σ̂ statistics collected (the preset's per-call EMA)
  all-live     the same step before the first freeze (every site live, statistics and aux loss on)
  all-frozen   the same step after the last removal (every site frozen, no specials, nothing collected)
  plain        lnfree's vanilla-control step: every LayerNorm live, no statistics, no aux loss
  transformers `GPT2LMHeadModel(idx, labels=idx).loss.backward()`, clip, AdamW step — with the HF Trainer's default
               AdamW (`adamw_torch_fused`) and, as a second line, with `torch.optim.AdamW()`'s own default

Every step: forward + backward + grad clip (1.0) + AdamW, the preset's dropout (0.1) in both. Tokens/s counts every
token of the step's batch. Prints the median and spread of each variant and the ratios paired within rounds. No
assertions: this is a measurement.

    .venv/bin/python benchmarks/train_step.py                      # GPT-2 small blocks, ctx 128, batch 4 (CPU)
    .venv/bin/python benchmarks/train_step.py --profile            # plus where a step's time goes, per kind of op
    .venv/bin/python benchmarks/train_step.py --layers 4 --rounds 3 --ctx 64    # quicker
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

SHAPES = {  # name: (n_layer, n_embd, n_head)
    "analog": (6, 128, 4),  # the offline demo's analog (use with --vocab 4096 --ctx 256 --batch 16)
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
    "xl": (48, 1600, 25),
}


def build_hf(n_layer: int, n_embd: int, n_head: int, vocab: int, n_positions: int, dropout: float, seed: int = 0):
    """A random-weight `transformers` GPT-2 (on CPU), dropout everywhere GPT-2 has it."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                                  n_positions=n_positions, resid_pdrop=dropout, embd_pdrop=dropout,
                                  attn_pdrop=dropout, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def ours_from(hf):
    """lnfree's GPT-2 with the weights of a `transformers` one (the checkpoint mapping `load_model` uses)."""
    from lnfree.models.gpt2 import GPT2_FAMILY

    config = {**hf.config.to_dict(), "architectures": ["GPT2LMHeadModel"]}
    return GPT2_FAMILY.from_hf(config, {k: v.detach().clone() for k, v in hf.state_dict().items()})


def build_pair(n_layer: int, n_embd: int, n_head: int, vocab: int, n_positions: int, dropout: float,
               device: str, seed: int = 0):
    """(lnfree model, transformers model) with the same random weights, on `device`."""
    hf = build_hf(n_layer, n_embd, n_head, vocab, n_positions, dropout, seed)
    return ours_from(hf).to(device), hf.to(device)


def token_batch(batch: int, ctx: int, vocab: int, seed: int, eot_every: int = 97) -> torch.Tensor:
    """Random ids with an end-of-text token every ~`eot_every` positions (the EOT specials have work to do)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab - 1, (batch, ctx), generator=g)
    idx[torch.rand(batch, ctx, generator=g) < 1 / eot_every] = vocab - 1
    return idx


@dataclass
class Variant:
    name: str
    what: str
    prepare: Callable[[], None]  # untimed: put the shared model in this variant's state
    step: Callable[[int, torch.Tensor], None]  # one whole optimizer step


def lnfree_variants(model, cfg, preset: str, device: str) -> list[Variant]:
    """The four lnfree steps on one shared model (each sets its own site states and σ̂ rule first)."""
    from lnfree.method.calibrate import apply_site_states, calibrate
    from lnfree.method.schedule import SiteState
    from lnfree.run.recipes import get_recipe, recipe_schedule
    from lnfree.run.step import Stepper

    recipe = get_recipe(preset, model.n_layers)
    schedule = recipe_schedule(recipe, model.site_layout())
    train_cfg = replace(recipe.train, **cfg)
    n_sites = len(model.norm_sites())
    half = next(s for s in range(schedule.total_steps)
                if sum(st.frozen for st in schedule.state_at(s).values()) >= n_sites // 2)
    last = schedule.total_steps - 1
    removal = Stepper(model, train_cfg, schedule, mode="lnfree", sigma=recipe.sigma, device=device)
    calibrate(model, [token_batch(cfg["micro_batch"], cfg["ctx"], model.vocab_size, 99).to(device)], recipe.sigma)
    control = Stepper(model, replace(train_cfg, aux_weight=0.0), schedule, mode="control", device=device)
    control.optimizer = removal.optimizer  # one AdamW state for the shared model (timing only)
    state = schedule.state_at(half)
    frozen = sum(s.frozen for s in state.values())
    specials = sum(s.frozen and (s.bos_weight > 0 or s.eot_weight > 0) for s in state.values())
    all_live = {n: SiteState(False, 0.0, 0.0) for n in model.norm_sites()}

    def at(step_index: int, stepper=removal):
        def prepare():
            stepper.start()
            stepper.begin(step_index)
        return prepare, lambda _, batch: stepper.run(step_index, batch)

    def plain_prepare():
        control.start()
        apply_site_states(model, all_live)

    return [
        Variant("removal", f"{frozen}/{n_sites} sites frozen ({specials} with specials), aux {train_cfg.aux_weight:g}, "
                           f"σ̂ EMA per {recipe.sigma.ema}", *at(half)),
        Variant("all-live", "every site live, statistics and aux loss on", *at(0)),
        Variant("all-frozen", "every site frozen, no specials", *at(last)),
        Variant("plain", "vanilla control: LayerNorm, no statistics, no aux loss", plain_prepare,
                lambda _, batch: control.run(0, batch)),
    ]


def transformers_variants(hf, lr: float, betas, weight_decay: float, device: str) -> list[Variant]:
    hf.train()

    def make(fused: bool | None):
        opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)

        def step(_, batch):
            loss = hf(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    return [Variant("transformers", "GPT2LMHeadModel + AdamW(fused=True), the HF Trainer's default optimizer",
                    lambda: None, make(True)),
            Variant("transformers-default", "GPT2LMHeadModel + torch.optim.AdamW() defaults", lambda: None,
                    make(None))]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_rounds(variants: list[Variant], batches: list[torch.Tensor], rounds: int, device: str) -> dict:
    """Seconds per step of each variant in each round (one warm-up step each first)."""
    for v in variants:
        v.prepare()
        v.step(0, batches[0])
    times = {v.name: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            v.prepare()
            batch = batches[(r + 1) % len(batches)]
            sync(device)
            t0 = time.perf_counter()
            v.step(r + 1, batch)
            sync(device)
            times[v.name].append(time.perf_counter() - t0)
    return times


def report(variants: list[Variant], times: dict, tokens: int, pairs: list[tuple[str, str]]) -> dict:
    print(f"{'variant':>22}  {'tokens/s (median)':>17}  {'spread (min–max)':>20}  what")
    for v in variants:
        rates = [tokens / t for t in times[v.name]]
        print(f"{v.name:>22}  {statistics.median(rates):17,.0f}  {min(rates):9,.0f}–{max(rates):<10,.0f}  {v.what}")
    ratios = {}
    print("ratios, paired within each round (tokens/s of the first over the second): median [min–max]")
    for a, b in pairs:
        if a not in times or b not in times:
            continue
        r = [tb / ta for ta, tb in zip(times[a], times[b], strict=True)]
        ratios[f"{a}/{b}"] = statistics.median(r)
        print(f"  {a} / {b}: {statistics.median(r):.3f}  [{min(r):.3f}–{max(r):.3f}]")
    return ratios


PROFILE_GROUPS = (  # (group, substrings of aten op names), first match wins
    ("matmul (linear, head, QKV)", ("addmm", "aten::mm", "bmm", "aten::linear", "matmul")),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("optimizer (AdamW)", ("adam",)),
    ("softmax / cross-entropy", ("log_softmax", "nll_loss", "cross_entropy", "_softmax")),
    ("LayerNorm (fused)", ("layer_norm",)),
    ("embedding", ("embedding",)),
    ("dropout (bernoulli)", ("bernoulli", "dropout")),
    ("GELU", ("gelu", "tanh")),
    ("grad clip (norms)", ("norm", "_foreach")),
    ("copies / zero fills", ("copy_", "fill_", "zero_", "clone", "contiguous", "cat", "stack")),
    ("elementwise (sites, residuals, σ̂ statistics, …)", ("add", "mul", "div", "sub", "pow", "sqrt", "mean", "sum",
                                                           "where", "rsqrt", "var", "masked", "exp", "neg")),
)


def profile_step(name: str, step: Callable[[int, torch.Tensor], None], batch: torch.Tensor) -> None:
    """Self time of one step's operators, grouped by kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(0, batch)
    groups: dict[str, float] = {}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        key = next((g for g, subs in PROFILE_GROUPS if any(s in e.key for s in subs)), "other")
        groups[key] = groups.get(key, 0.0) + e.self_cpu_time_total / 1e6
    total = sum(groups.values())
    print(f"  {name}: {total:.2f} s of operator time")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"    {g:<48} {t:7.3f} s  {t / total:6.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="small", help="GPT-2 block shape (random weights)")
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks of that shape (default: GPT-2's)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (one micro-batch)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dropout", type=float, default=0.1, help="in both models (the presets' 0.1; the demo: 0)")
    ap.add_argument("--preset", default="lnfree", help="whose schedule, σ̂ rule and training settings")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-transformers-default", action="store_true",
                    help="skip the second transformers line (torch's default AdamW)")
    ap.add_argument("--profile", action="store_true", help="also print where one step's time goes")
    args = ap.parse_args()

    n_layer, n_embd, n_head = SHAPES[args.shape]
    n_layer = args.layers or n_layer
    ours, hf = build_pair(n_layer, n_embd, n_head, args.vocab, max(args.ctx, 1024), args.dropout, args.device)
    cfg = {"batch_tokens": args.batch * args.ctx, "micro_batch": args.batch, "ctx": args.ctx, "dtype": "fp32",
           "compile": False, "dropout": args.dropout}
    variants = lnfree_variants(ours, cfg, args.preset, args.device)
    hf_variants = transformers_variants(hf, 1e-4, (0.9, 0.999), 0.01, args.device)
    if args.no_transformers_default:
        hf_variants = hf_variants[:1]
    variants = variants + hf_variants
    batches = [token_batch(args.batch, args.ctx, args.vocab, seed).to(args.device) for seed in range(4)]
    with torch.no_grad():  # the same function before any step: the comparison is like for like
        ours.eval(), hf.eval()
        from lnfree.run.step import next_token_loss

        next(v for v in variants if v.name == "plain").prepare()  # every site live
        ce_ours = next_token_loss(ours(batches[0]), batches[0]).item()
        ce_hf = hf(input_ids=batches[0], labels=batches[0]).loss.item()
        ours.train(), hf.train()
    tokens = args.batch * args.ctx
    print(f"# GPT-2 {n_layer}L×{n_embd} ({n_head} heads, vocab {args.vocab}), {args.batch}×{args.ctx} = {tokens} "
          f"tokens/step, fp32 on {args.device} ({torch.get_num_threads()} threads), dropout {args.dropout:g}, grad "
          f"clip 1.0; {args.rounds} interleaved rounds after a warm-up step each; preset {args.preset}; "
          f"CE before training: lnfree {ce_ours:.5f}, transformers {ce_hf:.5f}")
    times = run_rounds(variants, batches, args.rounds, args.device)
    report(variants, times, tokens, [("removal", "transformers"), ("removal", "transformers-default"),
                                     ("plain", "transformers"), ("removal", "plain"), ("all-live", "plain"),
                                     ("all-frozen", "plain")])
    if args.profile:
        print("where one step's time goes (torch.profiler, operator self time; CPU):")
        for v in variants:
            if v.name in ("removal", "plain", "transformers"):
                v.prepare()
                profile_step(v.name, v.step, batches[0])


if __name__ == "__main__":
    main()
