"""The auxiliary losses that keep per-token std uniform (method/aux.py), and the trace of a non-finite forward to
its norm site (method/diagnose.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from conftest import EOT, random_tokens
from lnfree.analysis.evaluate import evaluate_ce
from lnfree.method.aux import aux_std_loss, log_uniformity
from lnfree.method.calibrate import apply_site_states, calibrate
from lnfree.method.diagnose import first_nonfinite_site
from lnfree.method.model_sites import uniformity_terms
from lnfree.method.schedule import SiteState
from lnfree.models import load_model


def test_relative_and_log_forms_are_scale_free_and_baroni_is_not():
    torch.manual_seed(0)
    std = torch.rand(2, 6) + 0.5
    eot = torch.zeros(2, 6, dtype=torch.bool)
    eot[1, 3] = True
    regular = [std[b, t].item() for b in range(2) for t in range(1, 6) if not eot[b, t]]
    sigma_bar = sum(regular) / len(regular)
    baroni = aux_std_loss(std, eot)
    assert aux_std_loss(std, eot, "relative").item() == pytest.approx(baroni.item() / sigma_bar**2, rel=1e-6)
    geo_bar = math.exp(sum(math.log(v) for v in regular) / len(regular))  # the "sites" form's reference
    expected_log = sum(math.log(std[b, t].item() / geo_bar) ** 2 for b in range(2) for t in range(6)) / 12
    assert log_uniformity(std, eot).item() == pytest.approx(expected_log, rel=1e-6)
    # "sites-worst" adds each sequence's most outlying token: the mean over sequences of max_t log²(σ_t/σ̄)
    worst = sum(max(math.log(std[b, t].item() / geo_bar) ** 2 for t in range(6)) for b in range(2)) / 2
    assert log_uniformity(std, eot, worst=True).item() == pytest.approx(expected_log + worst, rel=1e-6)
    for c in (1e-3, 7.0, 1e4):
        assert aux_std_loss(c * std, eot, "relative").item() == pytest.approx(aux_std_loss(std, eot, "relative").item(),
                                                                             rel=1e-5)
        assert log_uniformity(c * std, eot).item() == pytest.approx(log_uniformity(std, eot).item(), rel=1e-4)
        assert aux_std_loss(c * std, eot).item() == pytest.approx(c**2 * baroni.item(), rel=1e-5)


def test_the_sites_form_reads_every_norm_input_once(hf_gpt2_dir):
    """One term per norm layer (ln_1 read by Q/K and by V counts once), each log²(σ_t/σ̄) of that layer's input as
    the activation cache shows it, with gradients to the weights."""
    model = load_model(hf_gpt2_dir)
    idx = random_tokens(seq=20)
    with uniformity_terms(model, "sites-worst") as worst_terms:
        model(idx)
    with uniformity_terms(model) as terms:
        model(idx)
    layers = model.norm_layers()
    assert len(terms) == len(layers) == 2 * model.n_layers + 1
    cache: dict = {}
    with torch.no_grad():
        model(idx, cache=cache)
    eot = idx == EOT
    first = cache["blocks.0.hook_resid_pre"]
    std = (first - first.mean(-1, keepdim=True)).pow(2).mean(-1).add(layers[0].eps).sqrt()
    assert terms[0].item() == pytest.approx(log_uniformity(std, eot).item(), rel=1e-5)
    assert worst_terms[0].item() == pytest.approx(log_uniformity(std, eot, worst=True).item(), rel=1e-5)
    torch.stack(terms).mean().backward()
    assert model.wte.weight.grad.abs().sum() > 0
    assert all(layer.uniformity is None for layer in layers)  # switched off after the block


def test_a_non_finite_forward_names_the_site_that_overflowed(hf_gpt2_dir):
    model = load_model(hf_gpt2_dir).eval()
    idx = random_tokens(seq=20)
    calibrate(model, [idx])
    assert first_nonfinite_site(model, idx) is None
    apply_site_states(model, {name: SiteState(True, 0.0, 0.0) for name in model.norm_sites()})
    model.norm_sites()["blocks.1.ln1.v"].sigma.fill_(1e-45)  # divides to inf
    cause = first_nonfinite_site(model, idx)
    assert cause.startswith("blocks.1.ln1.v (frozen, σ̂ ") and "first site whose output is not finite" in cause
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        stats = evaluate_ce(model, [idx], progress=False)
    assert not math.isfinite(stats.mean)
    assert any("blocks.1.ln1.v (frozen" in str(w.message) for w in seen)


def test_a_token_whose_square_overflows_keeps_the_aux_loss_and_its_gradient_finite(hf_gpt2_dir):
    """A runaway token still finite but past ~1.8e19 (its square leaves fp32) must not make the log-space auxiliary
    loss inf: it gets a finite, large penalty and a finite gradient; ordinary tokens' std is computed as before."""
    model = load_model(hf_gpt2_dir)
    layer = model.norm_layers()[1]
    x = torch.randn(2, 5, layer.weight.shape[-1])
    x[1, 3] *= 3e20  # finite, but its square overflows
    x.requires_grad_(True)
    std = layer.input_std(x)
    ordinary = (x[0] - x[0].mean(-1, keepdim=True)).pow(2).mean(-1).add(layer.eps).sqrt()
    assert torch.equal(std[0], ordinary)  # bitwise the plain formula where it does not overflow
    assert math.isfinite(std[1, 3].item()) and std[1, 3].item() > 1e38
    loss = log_uniformity(std, None, worst=True)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 100
    assert torch.isfinite(x.grad).all()
