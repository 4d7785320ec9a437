"""FakeLN sites against the papers' formula; σ̂ calibration and EMA rules; folding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from conftest import EOT, make_hf_gpt2, random_tokens
from lnfree.method.calibrate import apply_site_states, calibrate
from lnfree.method.model_sites import collect_norm_stats, ema_step, set_sigma_rule
from lnfree.method.schedule import SiteState
from lnfree.method.sites import RemovableLayerNorm
from lnfree.models import load_model
from lnfree.run.recipes import get_recipe


def _layer(d=12, roles=("ln2",)):
    torch.manual_seed(0)
    ln = RemovableLayerNorm(d, 1e-5, roles, 0)
    with torch.no_grad():
        ln.weight.normal_(1, 0.3)
        ln.bias.normal_(0, 0.3)
    return ln


def _fake_ln(x, sigma, ln):
    """Heimersheim 2024: (x − mean(x)) / σ̂ · γ + β, σ̂ broadcast per position."""
    return (x - x.mean(-1, keepdim=True)) / sigma * ln.weight + ln.bias


def test_live_site_is_layernorm_with_and_without_stat_collection():
    ln, x = _layer(), torch.randn(2, 5, 12) * 3
    ref = F.layer_norm(x, (12,), ln.weight, ln.bias, 1e-5)
    assert torch.allclose(ln(x)[0], ref, atol=1e-6)
    ln.collecting = True
    assert torch.allclose(ln(x)[0], ref, atol=1e-6)


def test_frozen_site_divides_by_fixed_sigma():
    ln, x = _layer(), torch.randn(2, 5, 12) * 3
    site = ln.sites[0]
    site.frozen.fill_(True)
    site.sigma.fill_(2.5)
    site.bos_weight.fill_(0.0)
    site.eot_weight.fill_(0.0)
    assert torch.allclose(ln(x)[0], _fake_ln(x, 2.5, ln), atol=1e-6)


def test_position_zero_special_is_on_the_position_axis():
    # The 2024 code indexed hidden channel 0; the special σ̂ belongs to sequence position 0.
    ln, x = _layer(), torch.randn(2, 5, 12) * 3
    site = ln.sites[0]
    site.frozen.fill_(True)
    site.sigma.fill_(2.0)
    site.sigma_bos.fill_(40.0)
    site.eot_weight.fill_(0.0)
    out = ln(x)[0]
    assert torch.allclose(out[:, 0], _fake_ln(x, 40.0, ln)[:, 0], atol=1e-6)  # every channel of position 0
    assert torch.allclose(out[:, 1:], _fake_ln(x, 2.0, ln)[:, 1:], atol=1e-6)  # channel 0 elsewhere untouched


def test_eot_special_and_geometric_easing():
    ln, x = _layer(), torch.randn(2, 6, 12)
    site = ln.sites[0]
    site.frozen.fill_(True)
    site.sigma.fill_(2.0)
    site.sigma_bos.fill_(8.0)
    site.sigma_eot.fill_(0.5)
    eot = torch.zeros(2, 6, dtype=torch.bool)
    eot[0, 3] = eot[1, 5] = True
    site.bos_weight.fill_(0.5)
    out = ln(x, eot)[0]
    expected = torch.full((2, 6, 1), 2.0)
    expected[0, 3] = expected[1, 5] = 0.5
    expected[:, 0] = (2.0 * 8.0) ** 0.5  # halfway between, geometrically
    assert torch.allclose(out, _fake_ln(x, expected, ln), atol=1e-6)


def test_qk_and_v_paths_switch_independently():
    ln, x = _layer(roles=("ln1qk", "ln1v")), torch.randn(2, 5, 12) * 3
    qk, v = ln.sites
    assert [qk.name, v.name] == ["blocks.0.ln1.qk", "blocks.0.ln1.v"]
    for s in (qk, v):
        s.bos_weight.fill_(0.0)
        s.eot_weight.fill_(0.0)
    qk.frozen.fill_(True)
    qk.sigma.fill_(4.0)
    out_qk, out_v = ln(x)
    assert torch.allclose(out_qk, _fake_ln(x, 4.0, ln), atol=1e-6)
    assert torch.allclose(out_v, F.layer_norm(x, (12,), ln.weight, ln.bias, 1e-5), atol=1e-6)


def test_attention_reads_qk_and_v_from_their_own_paths(tmp_path):
    """Block 0's attention output against a direct computation from transformers' weights."""
    hf = make_hf_gpt2(n_layer=1, n_head=4, n_embd=48)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path).eval()
    idx = random_tokens()
    model.h[0].ln_1.sites[0].frozen.fill_(True)  # Q/K path frozen at σ̂ = 3
    model.h[0].ln_1.sites[0].sigma.fill_(3.0)
    for s in model.norm_sites().values():
        s.bos_weight.fill_(0.0)
        s.eot_weight.fill_(0.0)
    cache = {}
    with torch.no_grad():
        model(idx, cache=cache)
        blk = hf.transformer.h[0]
        x = hf.transformer.wte(idx) + hf.transformer.wpe(torch.arange(idx.shape[1]))
        x_qk = (x - x.mean(-1, keepdim=True)) / 3.0 * blk.ln_1.weight + blk.ln_1.bias
        x_v = blk.ln_1(x)
        W, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias  # Conv1D: (in, 3D)
        q, k, _ = (x_qk @ W + b).split(48, -1)
        v = (x_v @ W + b)[..., 96:]
        heads = lambda t: t.view(3, -1, 4, 12).transpose(1, 2)
        att = (heads(q) @ heads(k).transpose(-1, -2)) / 12**0.5
        att = att.masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        z = (att @ heads(v)).transpose(1, 2)
    assert torch.allclose(cache["blocks.0.attn.hook_z"], z, atol=1e-5)


# ---- σ̂ measurement -----------------------------------------------------------------------------------------
def _std(x):
    return (x.var(-1, correction=0) + 1e-5).sqrt()


def test_calibration_measures_mean_std_with_position0_and_eot_apart(hf_gpt2_dir):
    model = load_model(hf_gpt2_dir)
    batches = [random_tokens(seed=s) for s in range(3)]
    sigmas = calibrate(model, batches)
    with torch.no_grad():
        caches = []
        for idx in batches:
            caches.append({})
            model(idx, cache=caches[-1])
    resid = torch.cat([c["blocks.1.hook_resid_mid"] for c in caches])  # ln2 input of block 1
    eot = torch.cat([b == EOT for b in batches])
    std = _std(resid)
    main = torch.ones_like(eot)
    main[:, 0] = False
    main &= ~eot
    site = model.norm_sites()["blocks.1.ln2"]
    assert sigmas["blocks.1.ln2"] == pytest.approx(std[main].mean().item(), rel=1e-5)
    assert site.sigma_bos.item() == pytest.approx(std[:, 0].mean().item(), rel=1e-5)
    eot[:, 0] = False
    assert site.sigma_eot.item() == pytest.approx(std[eot].mean().item(), rel=1e-5)
    assert sigmas["blocks.1.ln1.qk"] == sigmas["blocks.1.ln1.v"]  # one input, measured once for both paths


def test_ema_once_per_step_training_forwards_only(hf_gpt2_dir):
    model = load_model(hf_gpt2_dir).train()
    calibrate(model, [random_tokens(seed=9)])
    site_qk, site_v = model.h[0].ln_1.sites
    before = site_qk.sigma.item()
    idx = random_tokens(seed=1)
    # evaluation forwards outside collect_norm_stats leave no trace
    with torch.no_grad():
        model(idx)
    assert site_qk.stat_counts.sum() == 0
    # a training forward with activation checkpointing: the recompute in backward is not counted
    with collect_norm_stats(model):
        logits = checkpoint(model, idx, use_reentrant=False)
    counts_after_forward = site_qk.stat_counts.clone()
    logits.sum().backward()
    assert torch.equal(site_qk.stat_counts, counts_after_forward)
    assert counts_after_forward.sum() == idx.numel()
    with torch.no_grad():
        cache = {}
        model(idx, cache=cache)
    std = _std(cache["blocks.0.hook_resid_pre"])
    main = torch.ones_like(idx, dtype=torch.bool)
    main[:, 0] = False
    main &= idx != EOT
    ema_step(model, 0.9)
    expected = 0.9 * before + 0.1 * std[main].mean().item()
    # once per optimizer step, for each path — not twice for the shared ln_1
    assert site_qk.sigma.item() == pytest.approx(expected, rel=1e-5)
    assert site_v.sigma.item() == pytest.approx(expected, rel=1e-5)


def _centred_pooled_std(x):
    """The 2024 code's std_dicts: `tensor[:, 1:, :].std()` on TransformerLens' centred residual stream (as a
    population std: the code's n/(n−1) is negligible at GPT-2's 768 × 1023 elements, not at this test's 144)."""
    return (x - x.mean(-1, keepdim=True)).flatten().std(correction=0).item()


def test_calibration_rules_of_the_two_papers(hf_gpt2_dir):
    batches = [random_tokens(seed=s) for s in range(3)]
    model = load_model(hf_gpt2_dir)
    with torch.no_grad():
        resid = torch.cat([model(b, cache=(c := {})) is not None and c["blocks.1.hook_resid_mid"] for b in batches])
    eot = torch.cat([b == EOT for b in batches])
    assert eot[:, 1:].any()  # EOT tokens sit among positions ≥ 1 here
    site = model.norm_sites()["blocks.1.ln2"]
    # Heimersheim 2024: pooled std of positions ≥ 1 (EOT included), position 0's for the EOT special
    calibrate(model, batches, get_recipe("heimersheim2024", 2).sigma)
    assert site.sigma.item() == pytest.approx(_centred_pooled_std(resid[:, 1:]), rel=1e-4)
    assert site.sigma_bos.item() == pytest.approx(_centred_pooled_std(resid[:, :1]), rel=1e-4)
    assert site.sigma_eot.item() == site.sigma_bos.item()
    # Baroni et al. 2025: FakeLayerNorm.recompute_average_std — mean of sqrt(var + 1e-5) over every position
    calibrate(model, batches, get_recipe("baroni2025", 2).sigma)
    assert site.sigma.item() == pytest.approx(_std(resid).mean().item(), rel=1e-5)


class Reference2025LayerNorm:
    """The σ̂ of removing-layer-norm train.py's FakeLayerNorm (bos_special_treatment off, EXP_RECOMPUTE_STD_ON_REAL=1):
    every call moves `real_average_std`; a call on a real path copies it into the buffer the fake paths use."""

    def __init__(self, sigma: float, momentum: float):
        self.real = self.buffer = sigma
        self.momentum = momentum
        self.fake = {"qk": False, "v": False}

    def __call__(self, x, path):
        std = (x.var(dim=-1, unbiased=False) + 1e-5).sqrt()
        self.real = self.momentum * self.real + (1 - self.momentum) * std.mean().item()
        if not self.fake[path]:
            self.buffer = self.real

    def block_forward(self, x):  # Block.new_forward: ln_1 for Q/K, for V, and for V at EOT positions
        for path in ("qk", "v", "v"):
            self(x, path)


@pytest.mark.parametrize("tracking", ["norm", "site"])
def test_per_call_ema_is_the_2025_fakelayernorm(hf_gpt2_dir, tracking):
    from lnfree.method.sigma import SigmaRule

    model = load_model(hf_gpt2_dir).train()
    rule = SigmaRule(positions="pooled", ema="call", momentum=0.7, v_reads=2, tracking=tracking)
    calibrate(model, [random_tokens(seed=9)], rule)
    set_sigma_rule(model, rule, micro_batches_per_step=4)
    layer = model.h[0].ln_1
    qk, v = layer.sites
    ref = Reference2025LayerNorm(qk.sigma.item(), momentum=0.7)
    g = torch.Generator().manual_seed(0)
    for phase in ("live", "qk frozen", "all frozen"):
        if phase == "qk frozen":
            qk.frozen.fill_(True)
            ref.fake["qk"] = True
        if phase == "all frozen":
            v.frozen.fill_(True)
            ref.fake["v"] = True
        for _ in range(3):
            x = torch.randn(2, 9, 48, generator=g) * (1 + torch.rand(1, generator=g).item())
            with collect_norm_stats(model):
                layer(x, torch.zeros(2, 9, dtype=torch.bool))
            ref.block_forward(x)
            assert v.sigma.item() == pytest.approx(ref.buffer, rel=1e-5), phase
            if tracking == "norm":  # one buffer for both paths: the frozen Q/K path keeps moving with V
                assert qk.sigma.item() == pytest.approx(ref.buffer, rel=1e-5), phase
        if tracking == "site" and phase != "live":
            assert qk.sigma.item() != pytest.approx(ref.buffer, rel=1e-5)  # ours stopped when Q/K froze


def test_per_call_momentum_keeps_the_reference_fraction_per_step(hf_gpt2_dir):
    from lnfree.method.sigma import SigmaRule

    model = load_model(hf_gpt2_dir).train()
    rule = SigmaRule(positions="pooled", ema="call", momentum=0.9, reference_calls=16, v_reads=2, tracking="norm")
    set_sigma_rule(model, rule, micro_batches_per_step=4)  # 4 of our micro-batches stand for 16 of the reference
    x = torch.randn(3, 10, 48) * 2
    target = _std(x).mean().item()
    for layer, reads in ((model.h[0].ln_2, 1), (model.h[0].ln_1, 3)):
        for site in layer.sites:
            site.sigma.fill_(1.0)
        with collect_norm_stats(model):
            for _ in range(4):
                layer(x)
        kept = 0.9 ** (16 * reads)  # what 16 reference micro-batches keep of the old σ̂
        assert layer.sites[0].sigma.item() == pytest.approx(target + (1.0 - target) * kept, rel=1e-6)


def test_position0_holding_an_eot_token():
    ln, x = _layer(), torch.randn(2, 5, 12) * 3
    site = ln.sites[0]
    eot = torch.zeros(2, 5, dtype=torch.bool)
    eot[0, 0] = eot[1, 3] = True  # sequence 0 starts with EOT
    std = _std(x)
    ln.collecting = True
    ln(x, eot)
    ln.ema_step(0.0)
    assert site.sigma_bos.item() == pytest.approx(std[:, 0].mean().item(), rel=1e-6)  # position 0 counts as BOS
    assert site.sigma_eot.item() == pytest.approx(std[1, 3].item(), rel=1e-6)  # not as EOT
    main = torch.ones(2, 5, dtype=torch.bool)
    main[:, 0] = False
    main[1, 3] = False
    assert site.sigma.item() == pytest.approx(std[main].mean().item(), rel=1e-6)
    ln.collecting = False
    site.frozen.fill_(True)
    site.sigma.fill_(2.0)
    site.sigma_bos.fill_(30.0)
    site.sigma_eot.fill_(5.0)
    for bos_weight, first in ((1.0, 30.0), (0.0, 5.0)):  # BOS special while it lasts, then the EOT one
        site.bos_weight.fill_(bos_weight)
        expected = torch.full((2, 5, 1), 2.0)
        expected[1, 3] = 5.0
        expected[0, 0] = first
        expected[1, 0] = 30.0 if bos_weight else 2.0
        assert torch.allclose(ln(x, eot)[0], _fake_ln(x, expected, ln), atol=1e-6)


@pytest.mark.parametrize("tracking", ["site", "until-fixed"])
def test_sigma_freezes_at_the_switch_unless_it_tracks_until_fixed(hf_gpt2_dir, tracking):
    from lnfree.method.sigma import SigmaRule

    model = load_model(hf_gpt2_dir).train()
    calibrate(model, [random_tokens(seed=9)], SigmaRule(tracking=tracking))
    frozen = apply_site_states(model, {"blocks.0.ln2": SiteState(True, 1.0, 1.0),  # a special still weighted in
                                       "blocks.1.ln1.qk": SiteState(True, 0.0, 0.0)})  # divides by σ̂ alone
    assert frozen == ["blocks.0.ln2", "blocks.1.ln1.qk"]
    site = model.norm_sites()["blocks.0.ln2"]
    fixed = model.norm_sites()["blocks.1.ln1.qk"]
    live = model.norm_sites()["blocks.1.ln2"]
    s_frozen, s_fixed, s_live = site.sigma.item(), fixed.sigma.item(), live.sigma.item()
    idx = random_tokens(seed=3) * 0 + 5  # very different statistics
    with collect_norm_stats(model):
        model(idx)
    ema_step(model, 0.0)
    assert live.sigma.item() != s_live
    assert fixed.sigma.item() == s_fixed  # under every rule
    if tracking == "site":
        assert site.sigma.item() == s_frozen
        return
    cache: dict = {}
    with torch.no_grad():
        model(idx, cache=cache)  # ln2's input does not depend on ln2's own σ̂
    std = _std(cache["blocks.0.hook_resid_mid"])[:, 1:]  # the mean std of positions ≥ 1 (no EOT here)
    assert site.sigma.item() == pytest.approx(std.mean().item(), rel=1e-5)


def test_unknown_site_in_schedule_is_refused(hf_gpt2_dir):
    model = load_model(hf_gpt2_dir)
    with pytest.raises(ValueError, match="blocks.7.ln2"):
        apply_site_states(model, {"blocks.7.ln2": SiteState(True, 0.0, 0.0)})


# ---- folding ---------------------------------------------------------------------------------------------------
def _freeze_all(model, bos=0.0, eot=0.0):
    apply_site_states(model, {n: SiteState(True, bos, eot) for n in model.norm_sites()})


def _distinct_sigmas(model):
    """Give every site its own σ̂, as a real run does (Q/K freezes before V under an EMA): calibration alone
    gives both ln_1 paths the same value, which would hide a fold that swaps or shares them."""
    with torch.no_grad():
        for i, site in enumerate(model.norm_sites().values()):
            site.sigma.mul_(1.0 + 0.37 * (i % 3) + 0.05 * i)


@pytest.mark.parametrize("n_layer,n_head,n_embd", [(1, 2, 16), (3, 6, 90)])
def test_fold_gives_a_norm_free_model_with_equal_logits(tmp_path, n_layer, n_head, n_embd):
    make_hf_gpt2(n_layer=n_layer, n_head=n_head, n_embd=n_embd).save_pretrained(tmp_path)
    model = load_model(tmp_path).eval()
    calibrate(model, [random_tokens(seed=5)])
    _distinct_sigmas(model)
    _freeze_all(model)
    folded = model.fold().eval()
    assert not folded.has_normalization
    assert not any(isinstance(m, (torch.nn.LayerNorm, RemovableLayerNorm)) for m in folded.modules())
    assert folded.lm_head is not None and folded.lm_head.bias is not None  # untied, with bias
    idx = random_tokens(seed=6)
    with torch.no_grad():
        err = (model(idx) - folded(idx)).abs().max().item()
    assert err <= 1e-4, err


def test_fold_refuses_live_sites_and_specials(hf_gpt2_dir):
    model = load_model(hf_gpt2_dir)
    with pytest.raises(ValueError, match="still live"):
        model.fold()
    _freeze_all(model, bos=1.0)
    with pytest.raises(ValueError, match="special"):
        model.fold()


def test_fold_refuses_a_family_that_declares_too_few_reads(hf_gpt2_dir):
    """The generic fold copies what the twin shares by name and folds what `norm_reads` declares; a declaration
    that forgets a map (here the head) must not ship the twin's freshly initialised weights."""
    model = load_model(hf_gpt2_dir)
    calibrate(model, [random_tokens(seed=5)])
    _freeze_all(model)
    model.norm_reads = lambda twin, declared=model.norm_reads: declared(twin)[:-1]
    with pytest.raises(RuntimeError, match="lm_head"):
        model.fold()


# ---- RMSNorm sites (Llama, Qwen) ------------------------------------------------------------------------------
def _rms_layer(d=12):
    torch.manual_seed(1)
    ln = RemovableLayerNorm(d, 1e-6, ("ln2",), 0, rms=True)
    with torch.no_grad():
        ln.weight.normal_(1, 0.3)
    return ln


def test_rms_site_live_is_transformers_rmsnorm_and_frozen_divides_without_centring():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ln, x = _rms_layer(), torch.randn(2, 5, 12) * 3 + 1.5  # a non-zero mean: centring would show
    ref = LlamaRMSNorm(12, eps=1e-6)
    ref.weight.data.copy_(ln.weight.data)
    assert ln.bias is None
    assert torch.allclose(ln(x)[0], ref(x), atol=1e-6)
    ln.collecting = True
    ln(x)
    ln.ema_step(0.0)  # calibration: σ̂ = mean per-token RMS
    rms = (x.pow(2).mean(-1) + 1e-6).sqrt()
    site = ln.sites[0]
    assert site.sigma.item() == pytest.approx(rms[:, 1:].mean().item(), rel=1e-6)
    ln.collecting = False
    site.frozen.fill_(True)
    site.bos_weight.fill_(0.0)
    site.eot_weight.fill_(0.0)
    assert torch.allclose(ln(x)[0], x / site.sigma * ln.weight, atol=1e-6)


def test_rms_site_folds_into_the_linear_map_that_reads_it():
    from lnfree.method.fold import fold_layernorm_into_linear

    ln, x = _rms_layer(), torch.randn(2, 5, 12) * 3 + 1.5
    site = ln.sites[0]
    site.frozen.fill_(True)
    site.sigma.fill_(2.7)
    site.bos_weight.fill_(0.0)
    site.eot_weight.fill_(0.0)
    linear = torch.nn.Linear(12, 7)
    w, b = fold_layernorm_into_linear(ln.weight, None, site.sigma, linear.weight, linear.bias, centre=False)
    with torch.no_grad():
        assert torch.allclose(linear(ln(x)[0]), x @ w.T + b, atol=1e-5)


# ---- the compile-friendly path -----------------------------------------------------------------------------
@pytest.mark.parametrize("tracking,special", [("norm", "position"), ("site", "position"), ("site", "outlier"),
                                             ("until-fixed", "outlier")])
def test_static_graph_computes_what_the_branches_compute(tracking, special):
    """`set_static_graph` (what --compile runs) picks every divisor on the device instead of branching on the site
    state: outputs, gradients and the per-call σ̂ EMA must equal the eager branches' in every state a schedule
    passes through — live, frozen, specials at full, partial and zero weight, the two ln_1 paths apart."""
    from lnfree.method.sigma import SigmaRule

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 12, generator=g) * 2
    eot = torch.zeros(3, 7, dtype=torch.bool)
    eot[0, 3] = eot[2, 0] = eot[1, 6] = True
    rule = SigmaRule(ema="call", momentum=0.6, tracking=tracking, special=special, outlier_factor=1.0,
                     statistic="geo_std" if special == "outlier" else "mean_std")
    states = [(False, 1.0, 1.0), (True, 1.0, 1.0), (True, 0.5, 0.25), (True, 0.0, 1.0), (True, 0.0, 0.0)]
    for qk_state in states:
        for v_state in states:
            layers = []
            for static in (False, True):
                ln = _layer(roles=("ln1qk", "ln1v"))
                ln.static = static
                ln.rule, ln.call_momentum, ln.collecting = rule, 0.6, True
                for site, state, sigma in zip(ln.sites, (qk_state, v_state), (2.0, 3.0), strict=True):
                    site.set_state(*state)
                    site.sigma.fill_(sigma)
                    site.sigma_bos.fill_(7.0)
                    site.sigma_eot.fill_(0.5)
                xi = x.clone().requires_grad_()
                outs = ln(xi, eot)
                sum((o * (k + 1)).sum() for k, o in enumerate(outs)).backward()
                layers.append((outs, xi.grad, ln.weight.grad, [s.sigma.clone() for s in ln.sites],
                               [s.sigma_bos.clone() for s in ln.sites]))
            (eager, static) = layers
            for a, b in zip(eager[0], static[0], strict=True):
                assert torch.allclose(a, b, atol=1e-5), (qk_state, v_state)
            for a, b in zip(eager[1:3], static[1:3], strict=True):
                assert torch.allclose(a, b, atol=1e-4), (qk_state, v_state)
            for a, b in zip(eager[3] + eager[4], static[3] + static[4], strict=True):
                assert torch.allclose(a, b, rtol=1e-6), (qk_state, v_state)


def test_the_outlier_special_scales_only_tokens_above_k_sigma():
    """SigmaRule(special="outlier"): at weight w a frozen site divides a token by σ̂ · max(1, std / (k·σ̂))^w — σ̂
    alone for ordinary tokens, the token's own std / k at w = 1 for outliers (whatever their position), σ̂ at
    w = 0; the position-0 σ̂ plays no part."""
    from lnfree.method.sigma import SigmaRule

    ln = _layer()
    ln.rule = SigmaRule(special="outlier", outlier_factor=2.0)
    x = torch.randn(2, 6, 12)
    x = x / x.std(-1, keepdim=True, correction=0)  # every token's std 1 …
    x[1, 3] *= 50.0  # … but one outlier, away from position 0
    site = ln.sites[0]
    site.sigma.fill_(1.5)
    site.sigma_bos.fill_(1000.0)  # would be used by a position special: must not be here
    for w in (1.0, 0.5, 0.0):
        site.set_state(True, w, 0.0)
        out = ln(x)[0]
        std = (x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True).add(ln.eps).sqrt()
        divisor = 1.5 * (std / 3.0).clamp(min=1) ** w
        assert torch.allclose(out, _fake_ln(x, divisor, ln), atol=1e-5), w
    site.set_state(True, 1.0, 0.0)
    assert torch.allclose(ln(x)[0][0], _fake_ln(x, 1.5, ln)[0], atol=1e-6)  # ordinary tokens: σ̂ alone
    assert site.normalises  # weighted in: still normalises, so the model cannot fold yet


def test_geometric_mean_statistic_barely_moves_for_an_outlier(hf_gpt2_dir):
    from lnfree.method.sigma import SigmaRule

    model = load_model(hf_gpt2_dir)
    idx = random_tokens(seq=20)
    cache: dict = {}
    with torch.no_grad():
        model(idx, cache=cache)
    calibrate(model, [idx], SigmaRule(statistic="geo_std", positions="apart"))
    x = cache["blocks.1.hook_resid_pre"]
    std = (x - x.mean(-1, keepdim=True)).pow(2).mean(-1).add(1e-5).sqrt()
    main = torch.ones_like(std, dtype=torch.bool)
    main[:, 0] = False
    main &= idx != EOT
    expected = std[main].log().mean().exp()
    assert model.norm_sites()["blocks.1.ln1.qk"].sigma.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.norm_sites()["blocks.1.ln1.qk"].sigma_bos.item() == pytest.approx(std[:, 0].log().mean().exp().item(),
                                                                                  rel=1e-5)
