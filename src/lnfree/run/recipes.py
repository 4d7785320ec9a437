"""Named removal presets. A preset named after a paper reproduces that paper's code field by field — removal
schedule, optimizer, lr schedule, batch, dropout, auxiliary loss, σ̂ rule, specials — and its docstring names the
file, function and commit it transcribes and every place where we knowingly deviate. `lnfree` is our own
recipe; see its docstring for the evidence it was chosen on.

Each preset is a function of model depth, and the per-size ones (`baroni2025` and the presets built on it) of a
GPT-2 size: the removal shape (order, gaps) is per layer, so a preset lays out over any number of blocks, while the
size picks the paper's optimizer settings and step counts. A GPT-2 gets its size by depth (12/24/36/48 layers, as
the paper); a model of another family gets the GPT-2 size nearest its parameter count (`gpt2_size_for`).
Deviations shared by every paper preset (bug fixes of both codes, kept for all our runs):
  * EOT tokens count as targets: the 2025 code's collator masked every EOT target out of the loss (its pad
    token was the EOT token); the papers' evaluation scores EOT targets, so training does too.
  * σ̂ moves on training forwards only: the 2025 code also moved its EMA during the Trainer's evaluations.
  * Master weights stay fp32 under bf16 autocast on CUDA, as both codes ran when their papers' models were
    trained (the 2025 repository loads bf16 weights since commit 9b4fd50, 2025-05-22, after its final schedules).
  * The vanilla control (`--control`) trains without the auxiliary loss, which belongs to the removal; the 2025
    code's control kept it.
Beyond GPT-2 the papers say nothing: a family's extra norms are placed by kind (method/schedule.py) — Qwen3's
per-head q/k norms freeze right after the Q/K path of ln_1, at its gap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..method.schedule import SITE_KINDS, RemovalSpec, Schedule, SiteSpec, build_schedule, standard_layout
from ..method.sigma import SigmaRule
from ..models.names import PAPER_FAMILY
from .config import Recipe, TrainConfig

_HEIMERSHEIM = "Heimersheim 2024, arXiv 2409.13710"
_BARONI = "Baroni et al. 2025, arXiv 2507.02559"
CTX = 1024
_SEQUENCES_PER_STEP = 2**19 // CTX  # both codes: gradient accumulation = int(512 // micro-batch)


def _reference_batch(micro_batch: int) -> int:
    """Tokens per step of the papers' codes: int(2^19 / 1024 // micro) micro-batches of `micro` sequences."""
    return (_SEQUENCES_PER_STEP // micro_batch) * micro_batch * CTX


def heimersheim2024(n_layer: int) -> Recipe:
    """Heimersheim 2024: github.com/ApolloResearch/gpt2_noLN at commit 1f6c25e — `config/finetune_openwebtext.py`
    over `train.py`'s defaults, the LNRemover schedule in `train.py`, `FakeLayerNorm` in `model.py`.

    Transcribed: micro-batch 48 × int(512 // 48) = 10 accumulation steps (491,520 tokens per step), context 1024;
    AdamW betas (0.9, 0.95), weight decay 0.1 on matrices and embeddings (nanoGPT's `configure_optimizers`),
    grad clip 1.0, dropout 0; lr 6e-4, warmup 100 from 0, cosine to 6e-5 over `lr_decay_iters` 2000 (nanoGPT's
    `get_lr`); ln_2 from step 200 every 20 steps, ln_1 Q/K every 20, ln_1 V every 30, ln_f 30 steps after the
    last V, all EOT specials removed at once 20 steps later; no auxiliary loss; σ̂ fixed (no EMA), measured as
    in the code's `std_dicts` — the pooled std of positions ≥ 1 (`rms_std`) — and the EOT special sits on the
    ln_1 V path only, with position 0's σ̂ as its value (`bos_std`); positions ≥ 1, EOT included, make the
    common σ̂.
    Deviations: (1) the code's position-0 special indexed hidden channel 0 (`average_std[0] = std_bos`) at every
    FakeLayerNorm, and only ln_1's was ever reset; we drop that indexing, so position 0 divides by the common
    σ̂ in every channel — what the code did to position 0 in all channels but channel 0 — and there is no
    position-0 special or event. (2) σ̂ is measured by `calibrate` on this run's training data
    (`calibration_batches` micro-batches) instead of one sequence measured beforehand. (3) The code runs to
    `max_iters` 3000 and was stopped by hand (model card: ~1000 iterations, ~500M tokens); its last event, the
    channel-0 reset of ln_1, is at step 1160; we stop at 1200 on GPT-2 small. (4) Each 1024-token
    sequence gives 1023 next-token targets (nanoGPT's windows give 1024).
    """
    # The run ends 140 steps after the EOT specials go: the code's (channel-0) BOS reset 100 later, then 40.
    spec = RemovalSpec(start=200, gaps={"ln2": 20, "ln1qk": 20, "qk_norm": 20, "ln1v": 30, "ln_final": 30},
                       eot_after=20, bos_after=0, tail=140, eot_kinds=("ln1v",))
    train = TrainConfig(steps=1200, batch_tokens=_reference_batch(48), micro_batch=48, ctx=CTX, lr=6e-4,
                        min_lr=6e-5, warmup_steps=100, decay_steps=2000, weight_decay=0.1, betas=(0.9, 0.95),
                        grad_clip=1.0, dropout=0.0, aux_weight=0.0)
    sigma = SigmaRule(statistic="rms_std", positions="after_bos", ema="none", eot_sigma="bos")
    return Recipe("heimersheim2024", spec, train, sigma, source=_HEIMERSHEIM)


@dataclass(frozen=True)
class BaroniConfig:
    """The fields of one GPT-2 config function of github.com/submarat/removing-layer-norm `config.py`."""

    function: str
    n_layer: int
    max_steps: int  # the Trainer's max_steps: the cosine's horizon
    published_steps: int  # where the run stops: the aux runs' released checkpoints (schaeff/gpt2-*_LNFree<steps>);
    # the no-aux variants released none, so they run the config's max_steps
    base_batch_size: int  # sequences per micro-batch
    warmup_steps: int
    learning_rate: float
    min_lr: float
    start_ln2: int
    gaps: tuple[int, int, int]  # gap_ln2, gap_ln1qk, gap_ln1v
    momentum: float  # per FakeLayerNorm call
    aux_loss_weight: float


BARONI_CONFIGS: dict[str, BaroniConfig] = {
    "baroni2025-small": BaroniConfig("make_gpt2_standard_aux", 12, 300, 300, 32, 25, 6e-4, 3e-4, 20, (2, 2, 3),
                                     0.9, 0.1),
    "baroni2025-small-noaux": BaroniConfig("make_gpt2_standard", 12, 300, 300, 40, 20, 6e-4, 3e-4, 20,
                                           (2, 2, 3), 0.9, 0.0),
    "baroni2025-medium": BaroniConfig("make_gpt2_medium_fasttune_aux", 24, 500, 500, 22, 10, 6e-4, 3e-4, 20,
                                      (2, 2, 3), 0.9, 0.1),
    "baroni2025-medium-noaux": BaroniConfig("make_gpt2_medium_fasttune", 24, 500, 500, 22, 10, 6e-4, 3e-4, 20,
                                            (2, 2, 3), 0.9, 0.0),
    "baroni2025-large": BaroniConfig("make_gpt2_large_aux", 36, 1200, 600, 28, 15, 3e-4, 4e-5, 30, (4, 4, 6),
                                     0.9 ** (28 / 32), 0.03),
    "baroni2025-large-noaux": BaroniConfig("make_gpt2_large", 36, 1200, 1200, 28, 15, 3e-4, 4e-5, 30, (4, 4, 6),
                                           0.9 ** (28 / 32), 0.0),
    "baroni2025-xl": BaroniConfig("make_gpt2_xl_aux", 48, 1200, 800, 18, 20, 1e-4, 2e-5, 50, (4, 4, 6),
                                  0.9 ** (18 / 32), 0.01),
    "baroni2025-xl-noaux": BaroniConfig("make_gpt2_xl", 48, 1200, 1200, 18, 20, 1e-4, 2e-5, 20, (2, 2, 3),
                                        0.9 ** (18 / 32), 0.0),
}


def baroni_recipe(name: str, n_layer: int) -> Recipe:
    """Baroni et al. 2025: one config function of github.com/submarat/removing-layer-norm `config.py` at commit
    583a9e6 (identical for GPT-2 to 3d7f1c5 of 2025-05-20, before the paper), run by its `train.py` with
    EXP_RECOMPUTE_STD_ON_REAL=1 and no other flag (the repository's runner scripts of May 2025).

    Transcribed (see `BARONI_CONFIGS` for the per-size values): micro-batch `base_batch_size` × int(512 //
    base_batch_size) accumulation steps of 1024 tokens; transformers' Trainer defaults — AdamW betas (0.9,
    0.999), grad clip 1.0, GPT-2's dropout 0.1 — with `FinetuneConfig`'s weight decay 0.01 (the Trainer's default
    is 0) on every weight but biases (FakeLayerNorm is no nn.LayerNorm, so its gains are decayed too), and
    `cosine_with_min_lr` with warmup from 0 over `max_steps`; ln_2 from `start_ln2` every gap_ln2, ln_1 Q/K and
    V each n_layer × gap after the previous phase began, ln_f n_layer × gap_ln1v after the V phase began; the
    auxiliary std loss at `aux_loss_weight`;
    σ̂ follows an EMA at every FakeLayerNorm call (momentum per call; ln_1 is called three times per forward:
    Q/K, V, V at EOT positions; its paths share one σ̂, which keeps moving until V freezes) of the mean
    per-token std over every position, and freezes with the last path; no position-0 or EOT special
    (`bos_special_treatment` is never switched on, so the EOT branch divides by the common σ̂).
    The aux runs stop at their published checkpoints: 600 (large) and 800 (XL) of the configs' 1200
    `max_steps`, the cosine still decaying over 1200; the no-aux variants (`make_gpt2_large`, `make_gpt2_xl`) have
    no published checkpoint, so they run the code's 1200 steps.
    Deviations: (1) with a micro-batch other than `base_batch_size`, the per-call momentum is rescaled so that σ̂
    keeps the same fraction per optimizer step; (2) σ̂ starts from `calibrate` on this run's data instead of the
    repository's precomputed `std_dicts` (the EMA replaces either within the first steps); (3) a frozen Q/K
    path sees σ̂ including the current micro-batch (the code: up to the previous one), which keeps activation-
    checkpoint recomputes exact; (4) the shared deviations in this module's docstring.
    """
    c = BARONI_CONFIGS[name]
    g2, gqk, gv = c.gaps
    spec = RemovalSpec(start=c.start_ln2, gaps={"ln2": g2, "ln1qk": gqk, "qk_norm": gqk, "ln1v": gv, "ln_final": gv},
                       eot_after=0, bos_after=0, tail=0)
    # The tail (fine-tuning after the last event) keeps the published length at the published depth.
    last_event = build_schedule(spec, standard_layout(c.n_layer), 10**9).last_event
    spec = replace(spec, tail=c.published_steps - last_event)
    train = TrainConfig(steps=c.published_steps, batch_tokens=_reference_batch(c.base_batch_size),
                        micro_batch=c.base_batch_size, ctx=CTX, lr=c.learning_rate, min_lr=c.min_lr,
                        warmup_steps=c.warmup_steps, decay_steps=c.max_steps, weight_decay=0.01,
                        decay_norm_weights=True, betas=(0.9, 0.999), grad_clip=1.0, dropout=0.1,
                        aux_weight=c.aux_loss_weight)
    sigma = SigmaRule(statistic="mean_std", positions="pooled", ema="call", momentum=c.momentum,
                      reference_calls=_SEQUENCES_PER_STEP // c.base_batch_size, v_reads=2, tracking="norm")
    recipe = Recipe(name, spec, train, sigma, total_steps=c.published_steps, source=f"{_BARONI}, {c.function}")
    return recipe if n_layer == c.n_layer else replace(recipe, total_steps=None)


BARONI_BY_DEPTH = {12: "baroni2025-small", 24: "baroni2025-medium", 36: "baroni2025-large", 48: "baroni2025-xl"}


# Total parameters of each GPT-2 size (with embeddings), for models of other families.
GPT2_PARAMS = {"baroni2025-small": 124e6, "baroni2025-medium": 355e6, "baroni2025-large": 774e6,
               "baroni2025-xl": 1558e6}


def gpt2_size_for(family: str, n_layer: int, params: int | None = None) -> str:
    """The baroni2025 variant whose settings a model gets: a GPT-2 by its depth (the paper's sizes; other depths:
    small); a model of another family by the GPT-2 size nearest its parameter count (on a log scale), or by depth
    when the count is unknown (`lnfree schedule --layers`)."""
    if family == PAPER_FAMILY or params is None:
        return BARONI_BY_DEPTH.get(n_layer, "baroni2025-small")
    return min(GPT2_PARAMS, key=lambda size: abs(math.log(params / GPT2_PARAMS[size])))


def baroni2025(n_layer: int, size: str | None = None) -> Recipe:
    """The paper's per-size variant (with the auxiliary loss): `size` (a `gpt2_size_for` answer), else by depth;
    at another depth the size's per-layer shape is laid over the model's blocks and run for its tail length."""
    return baroni_recipe(size or gpt2_size_for(PAPER_FAMILY, n_layer), n_layer)


def all_at_once(n_layer: int) -> Recipe:
    """Baseline of ours: every site frozen at step 0 (after calibration), no specials; otherwise
    baroni2025-small's training settings and σ̂ rule."""
    base = baroni_recipe("baroni2025-small", 12)
    spec = RemovalSpec(start=0, gaps={}, eot_after=0, bos_after=0, tail=base.train.steps)
    return replace(base, name="all-at-once", removal=spec, total_steps=None, source="baseline: no gradual schedule")


def lnfree(n_layer: int, size: str | None = None) -> Recipe:
    """Ours: baroni2025's per-size recipe with two changes chosen on the offline analogs (benchmarks/analog.py,
    three seeds on the plain and the hard analog; figures in benchmarks/RESULTS.md). LN-free − vanilla CE gap,
    25 steps: plain analog +0.0462 ± 0.0018 vs baroni2025's +0.0553 ± 0.0020; hard analog (position-0 outlier)
    +0.528 ± 0.037 vs +1.424 ± 0.109. The changes:

      * position 0 and EOT keep their own σ̂ at every site once it freezes (σ̂ measured with those positions
        apart), and lose them site by site in removal order — the EOT specials spread over the first quarter
        of the steps after the last freeze, the position-0 specials over the second — instead of never having
        them (2025 code) or dropping every one in one step (our first build);
      * a slower lr decay: the cosine's horizon is twice the run, so the run ends halfway down it. The lr at the
        last freeze is then 0.98× the peak at 12 layers and 0.96× at 24, but 0.65× at 36 and 0.67× at 48, where
        the base presets freeze late in the run and decay toward a lower floor (tests/test_presets.py holds these
        figures).

    Same steps, batch, optimizer, dropout, aux loss and EMA rule as baroni2025 at each size, so gaps compare
    per fine-tuning token. Not the default: the analogs rank methods against each other but cannot say what GPT-2
    needs (they lack its position-0 outlier); a GPU run on GPT-2 decides.
    """
    base = baroni2025(n_layer, size)
    natural = build_schedule(base.removal, standard_layout(n_layer), base.total_steps)
    last_freeze = max(natural.freeze_at.values())
    span = (natural.total_steps - last_freeze) // 4
    spec = replace(base.removal, eot_kinds=SITE_KINDS, bos_kinds=SITE_KINDS, eot_after=1, bos_after=1,
                   special_span=span, eot_ramp=2, bos_ramp=2,
                   tail=natural.total_steps - (last_freeze + 2 * span + 2))
    train = replace(base.train, decay_steps=2 * base.train.steps)
    sigma = replace(base.sigma, positions="apart")
    return replace(base, name="lnfree", removal=spec, train=train, sigma=sigma,
                   source="ours: baroni2025 + specials eased out per site + an lr horizon twice the run")


def lnfree_uniform(n_layer: int, size: str | None = None) -> Recipe:
    """Ours, for real pretrained models (issue 20: SmolLM2-135M). `lnfree`'s schedule with six changes:

      * an auxiliary loss that makes the per-token std uniform at the input of every norm, scale-free
        (`aux_kind` "sites-worst": mean log²(σ_t/σ̄) plus each sequence's largest term, weight 10), where
        baroni2025's absolute loss at ln_final alone means something else on every model (SmolLM2: 298 at step 0,
        beside CE 2). The worst-token term is what removes massive activations: with the plain mean ("sites"),
        position 0 — one token of 256 — was still 6–10× the median token's std in blocks 3–20 after 250 steps,
        hidden by the outlier specials (CE 1.78 with them, NaN without); with it, every block's ratio was 1 after
        50 warm steps (held-out CE 2.02 → 2.87 at step 25 → 2.46 at step 50: the model relearns its attention
        sink);
      * the "outlier" special instead of position-0 / EOT specials: once a site freezes, any token whose std is
        above σ̂ keeps its live output (divided by its own std: a live norm for outliers only), eased out at every
        site together after the last freeze over three quarters of the remaining steps, weight (steps left /
        ramp)², then a tail at weight 0 — SmolLM2 writes massive activations at position 0 and at
        early delimiter tokens (a space at position 1: 10× the median in block 2, 600× after one frozen SwiGLU,
        inf by block 9). Capping outliers at 2σ̂ instead (first try) doubled the attention sink's keys and values
        at every freeze: held-out CE 2.08 → 3.29 over the Q/K phase, then gradient norms of 10³–10⁵ and CE 7.3
        in the V phase; with sites-worst, k = 2 was still worse than k = 1 (CE 3.48 against 1.92 at step 249 of
        400, both diverging in the ease-out);
      * σ̂ as the geometric mean of the per-token std, followed by one EMA update per optimizer step (momentum
        0.9; the same at any micro-batch or world size): an exploding token lifted the mean-std σ̂ of later sites
        from ~4 to ~10⁵ within ten steps and crushed every ordinary token;
      * σ̂ keeps following a frozen site's input until its special is gone (`tracking` "until-fixed"; the final
        model divides by the values it had then). With σ̂ fixed at each freeze, after 250 steps the median token
        sat 2–23 % above σ̂ at every frozen site, so the k = 1 special kept a live norm for most tokens: the
        model never learnt to do without one, and at weight 0 every token ran away through the SwiGLU blocks (CE
        NaN; even with σ̂ re-measured it was 10.8). From that checkpoint, all specials eased out over 200 steps
        with σ̂ following (a probe: weight (1 − s/200)², lr 5e-5): CE at weight 0 went NaN → 43.9 (step 80) →
        2.38 (step 100) → 2.29 (120), where the same ease over 100 steps without it stayed NaN and diverged at
        weight 0.2. Following on at weight 0 made it worse (run uwt-s0: held-out CE 2.30 → 6.13 over the last 76
        steps);
      * an lr for fine-tuning a pretrained model (1e-4, cosine to 1e-5 at the end of the run, so the last steps
        without any norm take small ones), no dropout;
      * a warm phase (a fifth of the natural schedule) before the first freeze, with the auxiliary loss at weight
        10 (the figures of the first bullet); at weight 1 and no warm phase the massive activations were still
        there when the specials were eased out, and the run collapsed then (CE 2.14 → 6.98).

    Measured on SmolLM2-135M: benchmarks/RESULTS.md.
    """
    base = lnfree(n_layer, size)
    natural = recipe_schedule(base, n_layer)
    warm = natural.total_steps // 5
    rest = natural.total_steps - max(natural.freeze_at.values())  # steps after the last freeze
    ramp = round(0.75 * rest)
    # the outlier special (below) at every site once it freezes, eased out at every site together over three
    # quarters of the steps after the last freeze, weight (steps left / ramp)², then a tail at weight 0 (easing each
    # out right after its own freeze, `bos_lag`, collapsed sooner: step 130 of 400); EOT positions need no special
    # of their own (an EOT token that is an outlier is one); the first freeze waits for a warm phase in which the
    # auxiliary loss alone shrinks the massive activations
    removal = replace(base.removal, eot_kinds=(), start=base.removal.start + warm, special_span=0, eot_after=1,
                      bos_after=ramp + 1, bos_ramp=ramp, bos_power=2.0, tail=rest - ramp - 2)
    train = replace(base.train, lr=1e-4, min_lr=1e-5, decay_steps=None, dropout=0.0, aux_weight=10.0,
                    aux_kind="sites-worst", betas=(0.9, 0.95))
    sigma = SigmaRule(statistic="geo_std", positions="apart", ema="step", momentum=0.9, tracking="until-fixed",
                      special="outlier", outlier_factor=1.0)
    total = None if base.total_steps is None else base.total_steps + warm
    return replace(base, name="lnfree-uniform", removal=removal, train=train, sigma=sigma, total_steps=total,
                   source="ours: lnfree + uniform per-token std at every norm (log loss) + fine-tuning lr")


# name → n_layer → Recipe; the per-size presets (SIZED_PRESETS) also take the GPT-2 size, (n_layer, size) → Recipe
PRESETS: dict[str, Callable[..., Recipe]] = {
    "heimersheim2024": heimersheim2024,
    "baroni2025": baroni2025,
    **{name: (lambda n_layer, name=name: baroni_recipe(name, n_layer)) for name in BARONI_CONFIGS},
    "all-at-once": all_at_once,
    "lnfree": lnfree,
    "lnfree-uniform": lnfree_uniform,
}


SIZED_PRESETS = ("baroni2025", "lnfree", "lnfree-uniform")  # settings per GPT-2 size (`gpt2_size_for`)
DEFAULT_PRESETS = {PAPER_FAMILY: "baroni2025"}  # per family; the rest take DEFAULT_OTHER
DEFAULT_OTHER = "lnfree-uniform"


def default_preset(family: str) -> str:
    """The preset a run gets when none is named: the 2025 paper's on GPT-2; ours for real models of other families
    (README, "Real models": baroni2025 diverges on SmolLM2-135M within its first freezes)."""
    return DEFAULT_PRESETS.get(family, DEFAULT_OTHER)


def for_family(asked: str, family: str, n_layer: int, params: int | None = None) -> tuple[Recipe, tuple[str, ...]]:
    """Preset `asked` for this model, and one note per choice a reader could not guess, for the plan a run prints:
    the GPT-2 size a per-size preset takes (`gpt2_size_for`); beyond GPT-2 Baroni's absolute auxiliary loss
    becomes its scale-free form (weighted for GPT-2's residual scale, it was 298 beside CE 2 on SmolLM2-135M)."""
    size = gpt2_size_for(family, n_layer, params)
    recipe = get_recipe(asked, n_layer, size)
    notes = []
    if asked in SIZED_PRESETS:
        if family != PAPER_FAMILY and params is not None:
            notes.append(f"{asked}: a {n_layer}-layer {family} model of {params / 1e6:.0f}M parameters gets "
                         f"{size}'s settings (the GPT-2 size nearest its parameter count), its per-layer schedule "
                         f"laid over {n_layer} blocks")
        elif n_layer not in BARONI_BY_DEPTH:
            notes.append(f"{asked}: no GPT-2 size has {n_layer} layers, so this is {size}'s per-layer start, gaps and "
                         f"settings (lr {BARONI_CONFIGS[size].learning_rate:g}), run for its tail "
                         "after the last removal")
    if family != PAPER_FAMILY and recipe.train.aux_weight > 0 and recipe.train.aux_kind == "baroni":
        recipe = replace(recipe, train=replace(recipe.train, aux_kind="relative"))
        notes.append("auxiliary loss scale-free (aux_kind relative: (σ_t − σ̄)² / σ̄²) on this non-GPT-2 model; the "
                     "absolute form's weight was set for GPT-2's residual scale")
    return recipe, tuple(notes)


def get_recipe(name: str, n_layer: int, size: str | None = None) -> Recipe:
    """Preset `name` laid over `n_layer` blocks; `size` (a baroni2025 variant) for the per-size presets, else by
    depth."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name](n_layer, size) if name in SIZED_PRESETS else PRESETS[name](n_layer)


def recipe_schedule(recipe: Recipe, layout: list[SiteSpec] | int, steps: int | None = None) -> Schedule:
    """The recipe's schedule over a model's sites (or the standard layout of that many blocks), rescaled to
    `steps` when the run is longer or shorter."""
    layout = standard_layout(layout) if isinstance(layout, int) else layout
    schedule = build_schedule(recipe.removal, layout, recipe.total_steps)
    return schedule.rescaled(steps) if steps and steps != schedule.total_steps else schedule


def describe_training(t: TrainConfig, s: SigmaRule) -> str:
    """One line of the settings a timeline does not show (for `lnfree schedule` and `lnfree remove`)."""
    ema = "σ̂ fixed" if not s.collects else f"σ̂ EMA per {s.ema} (momentum {s.momentum:.4g})"
    following = s.collects and s.tracking == "until-fixed"
    ema += f" of the {s.statistic}" + (", frozen sites too until their specials go" if following else "")
    aux = f"aux {t.aux_weight:g}" + (f" ({t.aux_kind})" if t.aux_weight else "")
    aux += f"; distillation {t.distill_weight:g}" if t.distill_weight else ""
    special = f"; {s.special} special (k={s.outlier_factor:g})" if s.special == "outlier" else ""
    decay = f"cosine to {t.min_lr:g} at step {t.decay_steps or t.steps}"
    if t.lora_rank:
        special += (f"; LoRA rank {t.lora_rank} (alpha {t.lora_alpha or t.lora_rank:g}) on {t.lora_targets}, "
                    f"{t.lora_trainable} trainable")
    return (f"lr {t.lr:g}, warmup {t.warmup_steps}, {decay}; {t.batch_tokens:,} tokens/step "
            f"({t.micro_batch} × {t.batch_tokens // (t.micro_batch * t.ctx)} × {t.ctx}); AdamW {t.betas}, "
            f"wd {t.weight_decay:g}; dropout {t.dropout:g}; {aux}; {ema}, {s.positions} positions{special}")
