"""The Llama-style family (LlamaForCausalLM, Qwen2ForCausalLM) against transformers: logits, round trips, fold,
exports, verify, and a short removal run — on random configs with odd head counts, GQA, tied and untied heads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import VOCAB, random_tokens
from family_checks import (
    frozen_with_distinct_sigmas,
    interop_reads_the_folded_model,
    logits_of,
    perturbed,
    removal_run_ends_verified,
)
from lnfree.export.core import PARITY_TOL, export_model
from lnfree.export.verify import verify
from lnfree.method.fold import normalising_sites
from lnfree.models import load_model, save_model

CASES = {  # name -> (architecture, config class, heads, kv heads, tied, extra config)
    "llama-gqa-untied": ("LlamaForCausalLM", transformers.LlamaConfig, 6, 2, False, {}),
    "llama-mha-tied-llama3rope": ("LlamaForCausalLM", transformers.LlamaConfig, 3, 3, True, {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "qwen2-gqa-tied": ("Qwen2ForCausalLM", transformers.Qwen2Config, 6, 3, True, {}),
    "qwen2-untied": ("Qwen2ForCausalLM", transformers.Qwen2Config, 5, 1, False, {"hidden_size": 40}),
    "qwen3-gqa-tied": ("Qwen3ForCausalLM", transformers.Qwen3Config, 6, 2, True, {"head_dim": 12}),
    "qwen3-untied-wide-heads": ("Qwen3ForCausalLM", transformers.Qwen3Config, 3, 3, False, {"head_dim": 20}),
}


def make_hf(case: str, seed: int = 0, noise: float = 0.1):
    arch, config_cls, heads, kv, tied, extra = CASES[case]
    torch.manual_seed(seed)
    cfg = config_cls(**{"vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
                        "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 64,
                        "tie_word_embeddings": tied, "eos_token_id": VOCAB - 1, "bos_token_id": VOCAB - 1, **extra})
    model = getattr(transformers, arch)(cfg).eval()
    return perturbed(model, noise)



@pytest.fixture(params=list(CASES))
def case_dir(request, tmp_path):
    make_hf(request.param).save_pretrained(tmp_path / "hf")
    return request.param, tmp_path / "hf"


def test_load_parity_round_trip_and_sites(case_dir, tmp_path):
    case, folder = case_dir
    hf, ours = transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), load_model(folder).eval()
    idx = random_tokens(seq=40)
    assert (logits_of(hf, idx) - logits_of(ours, idx)).abs().max().item() <= 1e-4
    assert [s.name for s in ours.site_layout()] == list(ours.norm_sites())
    assert all(layer.rms and layer.bias is None for layer in ours.norm_layers())
    save_model(ours, tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert type(again).__name__ == CASES[case][0]
    assert (logits_of(again, idx) - logits_of(ours, idx)).abs().max().item() <= 1e-4


def test_fold_is_exact_with_distinct_path_sigmas(case_dir):
    _, folder = case_dir
    model = frozen_with_distinct_sigmas(folder)
    folded = model.fold().eval()
    assert not folded.has_normalization and folded.lm_head is not None
    idx = random_tokens(seq=40, seed=3)
    assert (logits_of(model, idx) - logits_of(folded, idx)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fmt", ["hf", "hf-compat"])
def test_exports_reload_with_parity_and_verify_passes(case_dir, tmp_path, fmt):
    case, folder = case_dir
    model = frozen_with_distinct_sigmas(folder)
    save_model(model.fold(), tmp_path / "folded")
    result = export_model(tmp_path / "folded", tmp_path / "out", fmt)
    assert result.max_abs <= PARITY_TOL[fmt]
    arch = json.loads((tmp_path / "out" / "config.json").read_text())["architectures"][0]
    assert arch == ("LNFree" if fmt == "hf" else "") + CASES[case][0]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == arch
    assert not [n for n, m in reloaded.named_modules() if "RMSNorm" in type(m).__name__] or fmt == "hf-compat"
    idx = random_tokens(seq=40, seed=4)
    assert (logits_of(reloaded, idx) - logits_of(model, idx)).abs().max().item() <= 1e-4
    if fmt == "hf":
        report = verify(tmp_path / "out")
        assert report.passed, report.failures
        assert report.dla_max_abs_error <= 1e-10 and report.exports["hf"] <= 1e-10


def test_bad_llama_configs_are_refused_in_one_line(tmp_path):
    hf = make_hf("qwen2-untied")
    hf.config.use_sliding_window = True
    hf.save_pretrained(tmp_path / "sw")
    with pytest.raises(ValueError, match="use_sliding_window") as e:
        load_model(tmp_path / "sw")
    assert "\n" not in str(e.value)
    cfg = json.loads((tmp_path / "sw" / "config.json").read_text())
    cfg.update(use_sliding_window=False, num_key_value_heads=4)  # 5 heads are not a multiple of 4 K/V heads
    (tmp_path / "sw" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        load_model(tmp_path / "sw")


def test_a_short_removal_run_ends_norm_free_and_verified(tmp_path):
    arch = removal_run_ends_verified(make_hf("qwen2-gqa-tied", noise=0.02), tmp_path, "baroni2025")
    assert arch == "LNFreeQwen2ForCausalLM"


def test_a_new_model_for_pretraining_is_a_stock_checkpoint(tmp_path):
    """`lnfree pretrain --family llama` / `lnfree demo --family llama` start from this: live RMSNorms, tied
    embeddings, and a checkpoint transformers' own LlamaForCausalLM computes identically."""
    from lnfree.models import FAMILIES

    model = FAMILIES["llama"].new_model(VOCAB, 64, 48, 2, 4, VOCAB - 1, 0).eval()
    assert model.config.tie_word_embeddings and len(normalising_sites(model)) == 7
    save_model(model, tmp_path / "new")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "new").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = random_tokens(seq=40)
    assert (logits_of(hf, idx) - logits_of(model, idx)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["llama-gqa-untied", "qwen3-gqa-tied"])
def test_transformer_lens_and_nnsight_read_the_norm_free_llama(tmp_path, case):
    """TransformerLens' Llama / Qwen3 adapters and nnsight run the folded model exactly, with identity norms."""
    make_hf(case).save_pretrained(tmp_path / "hf")
    interop_reads_the_folded_model(tmp_path / "hf", tmp_path)