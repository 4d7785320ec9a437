"""Every paper preset against a table transcribed from that paper's code, so no later edit drifts silently.

Sources (read with the search tool's fetch; not vendored):
  * Heimersheim 2024: github.com/ApolloResearch/gpt2_noLN @ 1f6c25e, config/finetune_openwebtext.py, train.py
    (defaults, get_lr, LNRemover schedule), model.py (FakeLayerNorm, configure_optimizers).
  * Baroni et al. 2025: github.com/submarat/removing-layer-norm @ 583a9e6, config.py (one function per size and
    variant), train.py (FakeLayerNorm, TrainingArguments), run with EXP_RECOMPUTE_STD_ON_REAL=1.
The table holds the raw fields as the code writes them; every derived value (phase starts, tokens per step,
EMA calls per step) is recomputed here with the code's own formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from lnfree.run.config import TrainConfig
from lnfree.run.recipes import get_recipe, recipe_schedule
from lnfree.run.runs import removal_plan
from lnfree.run.step import lr_at

# config.py: name -> (function, n_layers, max_steps, where the run stops — the aux runs' published checkpoint, the
#                     no-aux runs' max_steps (they published none) —, base_batch_size, warmup_steps,
#                     learning_rate, min_lr, start_ln2, gap_ln2, gap_ln1qk, gap_ln1v, momentum, aux_loss_weight)
BARONI_TABLE = {
    "baroni2025-small": ("make_gpt2_standard_aux", 12, 300, 300, 32, 25, 6e-4, 3e-4, 20, 2, 2, 3, 0.9, 0.1),
    "baroni2025-small-noaux": ("make_gpt2_standard", 12, 300, 300, 40, 20, 6e-4, 3e-4, 20, 2, 2, 3, 0.9, 0.0),
    "baroni2025-medium": ("make_gpt2_medium_fasttune_aux", 24, 500, 500, 22, 10, 6e-4, 3e-4, 20, 2, 2, 3, 0.9, 0.1),
    "baroni2025-medium-noaux": ("make_gpt2_medium_fasttune", 24, 500, 500, 22, 10, 6e-4, 3e-4, 20, 2, 2, 3, 0.9,
                                0.0),
    "baroni2025-large": ("make_gpt2_large_aux", 36, 1200, 600, 28, 15, 3e-4, 4e-5, 30, 4, 4, 6, 0.9 ** (28 / 32),
                         0.03),
    "baroni2025-large-noaux": ("make_gpt2_large", 36, 1200, 1200, 28, 15, 3e-4, 4e-5, 30, 4, 4, 6, 0.9 ** (28 / 32),
                               0.0),
    "baroni2025-xl": ("make_gpt2_xl_aux", 48, 1200, 800, 18, 20, 1e-4, 2e-5, 50, 4, 4, 6, 0.9 ** (18 / 32), 0.01),
    "baroni2025-xl-noaux": ("make_gpt2_xl", 48, 1200, 1200, 18, 20, 1e-4, 2e-5, 20, 2, 2, 3, 0.9 ** (18 / 32), 0.0),
}
BLOCK_SIZE, TARGET_BATCH_TOKENS = 1024, 2**19


def site_name(kind, i=None):
    suffix = {"ln2": "ln2", "ln1qk": "ln1.qk", "ln1v": "ln1.v"}
    return "ln_final" if kind == "ln_final" else f"blocks.{i}.{suffix[kind]}"


def _expected_freezes(n, start_ln2, gap_ln2, gap_ln1qk, gap_ln1v):
    """config.py's phase starts and LNRemover's one-layer-per-gap rule."""
    start_ln1qk = start_ln2 + n * gap_ln2
    start_ln1v = start_ln1qk + n * gap_ln1qk
    start_lnf = start_ln1v + n * gap_ln1v
    out = {}
    for kind, start, gap in (("ln2", start_ln2, gap_ln2), ("ln1qk", start_ln1qk, gap_ln1qk),
                             ("ln1v", start_ln1v, gap_ln1v)):
        out.update({site_name(kind, i): start + i * gap for i in range(n)})
    out["ln_final"] = start_lnf
    return out


@pytest.mark.parametrize("name", list(BARONI_TABLE))
def test_baroni_presets_are_the_reference_configs(name):
    (function, n, max_steps, published, base_batch, warmup, lr, min_lr, start_ln2, g2, gqk, gv, momentum,
     aux) = BARONI_TABLE[name]
    recipe = get_recipe(name, n)
    schedule = recipe_schedule(recipe, n)
    assert function in recipe.source
    assert schedule.freeze_at == _expected_freezes(n, start_ln2, g2, gqk, gv)
    # bos_special_treatment is never switched on: no special σ̂ anywhere, so no EOT/BOS events
    assert schedule.eot_off == {} and schedule.bos_off == {}
    assert schedule.total_steps == published
    accumulation = int((TARGET_BATCH_TOKENS / BLOCK_SIZE) // base_batch)
    t = recipe.train
    args = transformers.TrainingArguments(output_dir="unused", report_to="none")  # the Trainer's defaults
    gpt2 = transformers.GPT2Config()
    assert (t.micro_batch, t.ctx, t.batch_tokens) == (base_batch, BLOCK_SIZE, base_batch * accumulation * BLOCK_SIZE)
    assert (t.lr, t.min_lr, t.warmup_steps, t.decay_steps) == (lr, min_lr, warmup, max_steps)
    # weight decay: FinetuneConfig's 0.01, handed to the Trainer (whose own default is 0)
    assert args.weight_decay == 0.0
    assert (t.weight_decay, t.betas, t.grad_clip) == (0.01, (args.adam_beta1, args.adam_beta2), args.max_grad_norm)
    assert t.decay_norm_weights  # FakeLayerNorm is not an nn.LayerNorm, so the Trainer decays its gains
    assert t.dropout == gpt2.resid_pdrop == gpt2.embd_pdrop == gpt2.attn_pdrop
    assert t.aux_weight == aux
    s = recipe.sigma
    assert (s.ema, s.momentum, s.reference_calls) == ("call", pytest.approx(momentum), accumulation)
    assert (s.statistic, s.positions, s.tracking, s.v_reads) == ("mean_std", "pooled", "norm", 2)


def test_heimersheim_preset_is_the_reference_config():
    # train.py defaults overridden by config/finetune_openwebtext.py; LNRemover schedule of train.py
    batch_size, dropout, lr, warmup_iters, lr_decay_iters, min_lr = 48, 0, 6e-4, 100, 2_000, 6e-5
    weight_decay, beta1, beta2, grad_clip = 1e-1, 0.9, 0.95, 1.0
    n_ln2, gap_ln2, gap_ln1qk, gap_ln1v = 200, 20, 20, 30
    recipe = get_recipe("heimersheim2024", 12)
    schedule = recipe_schedule(recipe, 12)
    assert schedule.freeze_at == _expected_freezes(12, n_ln2, gap_ln2, gap_ln1qk, gap_ln1v)
    n_eot = schedule.freeze_at["ln_final"] + 20
    # disable_eot_std runs on every block's ln_1 V path at once; the channel-0 "BOS" special is not copied
    assert schedule.eot_off == {site_name("ln1v", i): n_eot for i in range(12)}
    assert schedule.bos_off == {} and schedule.total_steps == 1200
    t = recipe.train
    accumulation = int((TARGET_BATCH_TOKENS / BLOCK_SIZE) // batch_size)
    assert (t.micro_batch, t.batch_tokens) == (batch_size, batch_size * accumulation * BLOCK_SIZE)
    assert (t.lr, t.min_lr, t.warmup_steps, t.decay_steps) == (lr, min_lr, warmup_iters, lr_decay_iters)
    assert (t.weight_decay, t.betas, t.grad_clip, t.dropout, t.aux_weight) == (
        weight_decay, (beta1, beta2), grad_clip, dropout, 0.0)
    assert not t.decay_norm_weights  # nanoGPT decays only tensors with dim >= 2
    s = recipe.sigma
    assert (s.collects, s.statistic, s.eot_sigma, s.positions) == (False, "rms_std", "bos", "after_bos")


def _nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's get_lr, as in ApolloResearch/gpt2_noLN train.py."""
    if it < warmup_iters:
        return learning_rate * it / warmup_iters
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def test_heimersheim_lr_is_nanogpts_get_lr():
    t = get_recipe("heimersheim2024", 12).train
    for step in range(t.steps):
        assert lr_at(step, t) == pytest.approx(_nanogpt_get_lr(step, 6e-4, 100, 2000, 6e-5), abs=1e-12)


@pytest.mark.parametrize("name", ["baroni2025-small", "baroni2025-medium", "baroni2025-large", "baroni2025-xl"])
def test_baroni_lr_is_the_trainers_cosine_with_min_lr(name):
    t = get_recipe(name, BARONI_TABLE[name][1]).train
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.lr)
    sched = transformers.get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=t.warmup_steps,
                                       num_training_steps=BARONI_TABLE[name][2],
                                       scheduler_specific_kwargs={"min_lr": t.min_lr})
    for step in range(t.steps):  # the lr the Trainer's optimizer step number `step` uses
        assert lr_at(step, t) == pytest.approx(sched.get_last_lr()[0], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()


def test_shorter_runs_stretch_warmup_and_horizon_unless_given():
    plan = removal_plan(36, "baroni2025-large", {"steps": 300})  # the large preset (600 steps) at half length
    assert (plan.train.steps, plan.train.warmup_steps, plan.train.decay_steps) == (300, 8, 600)
    assert plan.schedule.rescaled_from == 600
    plan = removal_plan(36, "baroni2025-large", {"steps": 300, "warmup_steps": 0, "decay_steps": 5000})
    assert (plan.train.warmup_steps, plan.train.decay_steps) == (0, 5000)
    assert removal_plan(12, "baroni2025", {"ema_momentum": 0.5}).sigma.momentum == 0.5
    with pytest.raises(ValueError, match="--steps must be at least 1"):
        removal_plan(12, "baroni2025", {"steps": 0})


def test_lr_schedule_flat_after_the_horizon_and_warmup_from_zero():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=50)
    assert lr_at(0, cfg) == 0.0 and lr_at(5, cfg) == pytest.approx(5e-4) and lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(50, cfg) == pytest.approx(1e-4) and lr_at(99, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_cli_schedule_prints_the_reference_steps_for_every_size(capsys):
    from lnfree.cli import main

    for preset, layers, lines in (
        ("baroni2025", 12, ["    20  blocks.0.ln2         freeze", "   104  ln_final             freeze",
                            "   300  *                    end of run (37 sites)"]),
        ("baroni2025", 24, ["    68  blocks.0.ln1.qk      freeze", "   188  ln_final             freeze"]),
        ("baroni2025", 36, ["   174  blocks.0.ln1.qk      freeze", "   534  ln_final             freeze",
                            "   600  *                    end of run (109 sites)"]),
        ("baroni2025", 48, ["   242  blocks.0.ln1.qk      freeze", "   722  ln_final             freeze"]),
        ("baroni2025-xl-noaux", 48, ["   116  blocks.0.ln1.qk      freeze", "   356  ln_final             freeze"]),
        ("heimersheim2024", 12, ["  1040  ln_final             freeze",
                                 "  1060  *                    eot special σ̂ removed (12 sites)"]),
    ):
        assert main(["schedule", "--preset", preset, "--layers", str(layers)]) == 0
        printed = capsys.readouterr().out.splitlines()
        for line in lines:
            assert line in printed, (preset, layers, line)
        assert "AdamW" in printed[1]  # the training settings line


def test_the_lnfree_presets_lr_claim_holds_at_every_gpt2_depth():
    """The `lnfree` preset's docstring and README state the lr at the last freeze at GPT-2's four depths, and those
    figures are the code's (its earlier claim, no lr decay before the last removal, held at 12 and 24 layers only)."""
    from pathlib import Path

    from lnfree.run import recipes

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    texts = {"docstring": " ".join(recipes.lnfree.__doc__.split()), "README": readme}
    for n_layer, stated in {12: 0.98, 24: 0.96, 36: 0.65, 48: 0.67}.items():
        recipe = get_recipe("lnfree", n_layer)
        t = recipe.train
        assert t.decay_steps == 2 * t.steps  # the cosine's horizon: twice the run
        last_freeze = max(recipe_schedule(recipe, n_layer).freeze_at.values())
        assert round(lr_at(last_freeze, t) / t.lr, 2) == stated, n_layer
        for where, text in texts.items():
            assert f"{stated:.2f}×" in text, (where, n_layer)
    for where, text in {**texts, "source": get_recipe("lnfree", 12).source}.items():
        assert "no lr decay" not in text and "no decay before" not in text, where


def test_a_per_size_preset_takes_its_gpt2_size_from_the_parameter_count_beyond_gpt2():
    """A 36-layer Llama of 130M parameters is no GPT-2 large: it gets small's settings (lr 6e-4, 300 steps at
    depth 12), and a 1.5B-parameter model of 12 layers XL's (lr 1e-4) — with the choice said in the plan's notes.
    A GPT-2 keeps the paper's choice by depth."""
    small = removal_plan(36, "baroni2025", {}, family="llama", params=130_000_000)
    assert small.train.lr == 6e-4
    assert any("baroni2025-small" in note and "130M" in note for note in small.notes)
    assert removal_plan(12, "lnfree", {}, family="gpt_neox", params=1_500_000_000).train.lr == 1e-4
    assert removal_plan(36, "baroni2025", {}, family="gpt2", params=130_000_000).train.lr == 3e-4
