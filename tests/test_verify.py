"""`lnfree verify`: passes on LN-free models with exact DLA and export parity; fails, saying where, with LN."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_tokens
from lnfree.cli import main
from lnfree.export.core import load_norm_free
from lnfree.export.verify import DLA_REL_TOL, dla_errors, verify
from lnfree.method.fold import normalising_sites
from lnfree.models import load_model, save_model
from test_export import frozen_model, make_dirs


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_dirs(tmp_path_factory.mktemp("models"))


def test_verify_passes_on_a_folded_model(dirs):
    report = verify(dirs["folded"])
    assert report.passed, report.failures
    assert report.norm_modules == [] and report.live_sites == []
    assert report.dla_max_abs_error <= 1e-10 and report.dla_relative_error <= DLA_REL_TOL
    assert set(report.exports) == {"hf", "hf-compat"}
    assert report.exports["hf"] <= 1e-10 and report.exports["hf-compat"] <= 1e-5


def test_verify_fails_on_the_original_and_says_where(dirs):
    report = verify(dirs["ln"])
    assert not report.passed
    assert len(report.live_sites) == 7 and "blocks.0.ln1.qk" in report.live_sites
    assert report.norm_modules == ["h.0.ln_1", "h.0.ln_2", "h.1.ln_1", "h.1.ln_2", "ln_f"]
    # attributions are far from direct effects with a live final LayerNorm (Baroni et al.: 49% on GPT-2)
    assert report.dla_relative_error > 0.05 and report.dla_max_abs_error > 1e-2
    text = " | ".join(report.failures)
    assert "7 live norm site(s)" in text and "direct logit attribution is not exact" in text and "%" in text
    assert all(v.startswith("skipped") for v in report.exports.values())


def test_dla_is_exact_on_the_folded_model_and_not_with_layernorm(dirs):
    batches = [random_tokens(batch=2, seq=30, seed=11)]
    folded_abs, folded_rel = dla_errors(load_norm_free(dirs["folded"]).model, batches)
    ln_abs, ln_rel = dla_errors(load_model(dirs["ln"]).eval(), batches)
    assert folded_abs <= 1e-4 and folded_rel <= 1e-5
    assert ln_rel > 100 * max(folded_rel, 1e-7)


def test_verify_folds_frozen_and_published_models(dirs):
    assert verify(frozen_model(dirs["ln"]), exports=False).passed  # frozen sites, no specials: folds away
    report = verify(dirs["published"], exports=False)  # the eps=1e12 convention is read as frozen sites
    assert report.passed, report.failures  # (its exports are checked in test_export.py)


def test_a_special_sigma_counts_as_live(dirs):
    model = frozen_model(dirs["ln"])
    model.norm_sites()["blocks.1.ln2"].bos_weight.fill_(1.0)
    report = verify(model, exports=False)
    assert report.live_sites == ["blocks.1.ln2"] and not report.passed


def test_an_untied_head_passes_with_compat_reported_unsupported(tmp_path, dirs):
    model = load_norm_free(dirs["folded"]).model
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.1)
    save_model(model, tmp_path / "untied")
    report = verify(tmp_path / "untied")
    assert report.passed and report.exports["hf"] <= 1e-4
    assert report.exports["hf-compat"].startswith("unsupported")


def test_cli_verify_exit_codes_and_figures(dirs, capsys):
    assert main(["verify", str(dirs["folded"])]) == 0
    out = capsys.readouterr().out
    for key in ("dla_max_abs_error=", "dla_relative_error=", "export_hf_max_abs=", "export_hf_compat_max_abs="):
        assert key in out
    assert out.strip().splitlines()[-1].startswith("PASS")
    assert main(["verify", str(dirs["ln"]), "--no-exports"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: normalization remains" in out and "FAIL: direct logit attribution is not exact" in out


def test_cli_verify_missing_model_is_one_line_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lnfree: error:") and "\n" not in err


def test_eval_and_verify_agree_on_a_site_that_keeps_a_special(dirs):
    """One definition of "still normalising": a frozen site whose position-0 σ̂ is still weighted in counts."""
    from lnfree.analysis.eval_suite import _model_info
    from lnfree.method.calibrate import apply_site_states, calibrate
    from lnfree.method.schedule import SiteState

    model = load_model(dirs["ln"]).eval()
    calibrate(model, [random_tokens(seed=1)])
    states = {n: SiteState(True, 0.0, 0.0) for n in model.norm_sites()}
    states["blocks.1.ln2"] = SiteState(True, 1.0, 0.0)
    apply_site_states(model, states)
    assert normalising_sites(model) == ["blocks.1.ln2"]
    assert verify(model, exports=False).live_sites == ["blocks.1.ln2"]
    assert _model_info(model)["live_norm_sites"] == 1


def test_a_truncated_weights_file_is_one_line_everywhere(tmp_path, dirs, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dirs["folded"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    for argv in (["verify", str(broken)], ["export", str(broken), "--out", str(tmp_path / "out")],
                 ["eval", str(broken), "--data", "stdlib-val", "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lnfree: error: a weights file is unreadable") and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_non_finite_logits_fail_verify_and_export_instead_of_reading_as_zero_error(tmp_path, dirs, capsys):
    """A norm-free model whose activations overflow on random tokens (a LoRA run on SmolLM2 gave one: an EOT token
    grew to inf by block 20) must not pass with its errors read as 0: max() over floats drops a NaN."""
    model = load_norm_free(dirs["folded"]).model
    with torch.no_grad():
        model.output_projections()[0][0].weight[0, 0] = float("inf")  # block 0's attention output overflows
    save_model(model, tmp_path / "overflows")
    report = verify(tmp_path / "overflows")
    assert not report.passed and math.isnan(report.dla_max_abs_error)
    assert any("logits are not finite" in f for f in report.failures), report.failures
    assert all(v == "skipped: non-finite logits" for v in report.exports.values())
    assert main(["export", str(tmp_path / "overflows"), "--out", str(tmp_path / "out")]) != 0
    assert "nan" in capsys.readouterr().err and not (tmp_path / "out").exists()
