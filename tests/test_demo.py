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
    # a second demo reuses the cached pretraining: the pretrained weights are not written again
    from lnfree.demo import demo_cache_dir, prepare_tokenizer, pretrained_folder

    cfg = quick_config()
    weights = pretrained_folder(cfg, prepare_tokenizer(cfg, demo_cache_dir()), demo_cache_dir()) / "final"
    written = {p.name: p.stat().st_mtime_ns for p in weights.iterdir()}
    again = run_demo(tmp_path / "out2", cfg)
    assert {p.name: p.stat().st_mtime_ns for p in weights.iterdir()} == written
    assert again["ce_original"] == results["ce_original"]


def test_planted_writer_makes_position_zero_an_outlier_written_by_block_0_mlp():
    import torch

    from lnfree.models.gpt2 import GPT2, GPT2Config, init_weights

    model = init_weights(GPT2(GPT2Config(vocab_size=64, n_positions=32, n_embd=128, n_layer=2, n_head=2)))
    model.plant_position0_writer(scale=40.0)
    cache = {}
    with torch.no_grad():
        model(torch.randint(0, 64, (4, 32)), cache=cache)
    written = cache["blocks.0.hook_mlp_out"].norm(dim=-1)  # (B, T)
    assert written[:, 0].min() > 20 * written[:, 1:].max()  # only position 0 fires the planted neurons
    std = cache["blocks.1.hook_resid_pre"].std(-1)
    assert (std[:, 0] / std[:, 1:].mean(-1)).min() > 10


def test_fresh_rebuilds_only_its_own_analog(tmp_path, monkeypatch):
    from dataclasses import replace

    from lnfree.demo import demo_cache_dir, prepare_tokenizer, pretrained_folder

    monkeypatch.setenv("LNFREE_DEMO_CACHE", str(tmp_path / "cache"))
    cfg = quick_config()
    run_demo(tmp_path / "out", cfg)
    tok_dir = prepare_tokenizer(cfg, demo_cache_dir())
    own = pretrained_folder(cfg, tok_dir, demo_cache_dir())
    (own / "final" / "stale-marker").write_text("from the first pretraining")
    other = pretrained_folder(replace(cfg, seed=7), tok_dir, demo_cache_dir())
    (other / "final").mkdir(parents=True)
    (other / "final" / "model.safetensors").write_text("another analog's weights")
    run_demo(tmp_path / "out", cfg, fresh=True)
    assert not (own / "final" / "stale-marker").exists()  # pretrained again …
    assert (own / "final" / "model.safetensors").stat().st_size > 1000
    assert (other / "final" / "model.safetensors").read_text() == "another analog's weights"  # … alone


def test_the_harder_analog_is_refused_for_families_without_one():
    from lnfree.models import FAMILIES

    model = FAMILIES["llama"].new_model(64, 32, 32, 1, 2, 63, 0)
    with pytest.raises(ValueError, match="GPT-2 only"):
        model.plant_position0_writer(40.0)


def test_new_training_settings_keep_the_cached_analogs_keys():
    """Each analog is pretrained once (~20 minutes here) and found again by its key; a TrainConfig field added
    later must not change the key of the analogs cached before it (it did once, and re-pretrained them)."""
    from dataclasses import replace

    from lnfree.demo import DemoConfig, hard_config

    assert DemoConfig().key() == "4ab4ef78eed2"  # keys of the analogs pretrained on 2026-11-28/29
    assert hard_config().key() == "6bfae190c55f"
    assert replace(DemoConfig(), family="llama").key() == "fa99f298f706"
    assert replace(DemoConfig(), pretrain=replace(DemoConfig().pretrain, lr=1e-3)).key() != DemoConfig().key()


def test_the_default_analog_ships_with_the_package():
    """`lnfree demo` needs no pretraining: the default analog, its tokenizer and its card are package files, and only
    the configuration that made it picks it up."""
    from dataclasses import replace

    from lnfree.demo import DemoConfig, hard_config, shipped_analog
    from lnfree.models import load_model
    from lnfree.tokenizer import load_tokenizer

    folder = shipped_analog(DemoConfig())
    assert folder is not None
    card = json.loads((folder / "analog.json").read_text())
    assert card["demo_key"] == DemoConfig().key() and "lnfree demo --fresh" in card["made_by"]
    assert "lnfree demo --fresh" in (folder / "README.md").read_text()
    model = load_model(folder)
    assert (model.n_layers, model.config.n_embd, len(load_tokenizer(folder))) == (6, 128, 4096)
    for other in (quick_config(), hard_config(), replace(DemoConfig(), family="llama"), replace(DemoConfig(), seed=1)):
        assert shipped_analog(other) is None


def test_a_first_demo_takes_the_shipped_analog_and_fresh_pretrains(tmp_path, monkeypatch):
    """With an empty cache the demo reads this stdlib with the shipped tokenizer and fine-tunes the shipped model —
    no tokenizer trained, nothing pretrained; `--fresh` trains and pretrains its own. (A stand-in analog for the quick
    configuration plays the shipped one.)"""
    from lnfree import demo
    from lnfree.models import FAMILIES, save_model
    from lnfree.tokenizer import load_tokenizer

    cfg = quick_config()
    tok_dir = demo.prepare_tokenizer(cfg, tmp_path / "maker")
    tok = load_tokenizer(tok_dir)
    model = FAMILIES["gpt2"].new_model(len(tok), cfg.ctx, cfg.n_embd, cfg.n_layer, cfg.n_head, tok.eos_token_id, 3)
    shipped = save_model(model, tmp_path / "shipped", tokenizer_from=tok_dir)
    (shipped / "analog.json").write_text(json.dumps({"demo_key": cfg.key(), "made_by": "a test"}))
    monkeypatch.setattr(demo, "SHIPPED_ANALOG", shipped)
    monkeypatch.setenv("LNFREE_DEMO_CACHE", str(tmp_path / "cache"))
    first = run_demo(tmp_path / "out", cfg)
    made = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert made == ["tokens"] and first["analog"] == "shipped with lnfree"
    assert "shipped with lnfree" in (tmp_path / "out" / "report.md").read_text()
    fresh = run_demo(tmp_path / "out", cfg, fresh=True)
    made = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert made == ["pretrain", "tokenizer", "tokens"] and fresh["analog"] != first["analog"]
    assert fresh["ce_original"] < first["ce_original"]  # pretrained here, against the untrained stand-in
