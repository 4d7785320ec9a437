"""The offline demo end to end, at a tiny size: every stage runs and the report holds real figures."""

from __future__ import annotations

import json

import pytest

from lnfree.demo import quick_config, run_demo


def test_quick_demo_writes_report_results_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("LNFREE_DEMO_CACHE", str(tmp_path / "cache"))
    results = run_demo(tmp_path / "out", quick_config())
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    for key in ("ce_original", "ce_vanilla", "ce_lnfree", "ft_tokens", "pretrain_tokens", "wall_seconds"):
        assert key in saved
    assert saved["ce_lnfree"] == pytest.approx(results["ce_lnfree"])
    assert saved["verify"]["passed"], saved["verify"]
    assert saved["ft_tokens"] == quick_config().ft_steps() * quick_config().pretrain.batch_tokens
    report = (out / "report.md").read_text()
    assert f"{saved['ce_lnfree']:.4f}" in report and "position 0" in report
    for png in ("loss_curves.png", "sigma_per_site.png", "residual_std_by_position.png"):
        assert (out / png).stat().st_size > 1000
    # the exported LN-free model loads in plain transformers after `import lnfree`
    assert json.loads((out / "export" / "config.json").read_text())["architectures"] == ["LNFreeGPT2LMHeadModel"]
    # a second demo reuses the cached pretraining
    again = run_demo(tmp_path / "out2", quick_config())
    assert again["pretrain_seconds"] < results["pretrain_seconds"] or results["pretrain_seconds"] < 1
    assert again["ce_original"] == results["ce_original"]
