"""The GPT-NeoX family (Pythia) against transformers: logits, round trips, fold, exports, verify, interop and a
short removal run — parallel and sequential residual, partial rotary, with and without attention biases."""

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
from lnfree.models import load_model, save_model

CASES = {  # name -> config overrides
    "pythia-parallel": {},
    "sequential-no-bias-full-rotary": {"use_parallel_residual": False, "attention_bias": False,
                                       "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                           "partial_rotary_factor": 1.0}},
}


def make_hf(case: str, seed: int = 0, noise: float = 0.1) -> transformers.GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(**{"vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 96,
                                        "num_hidden_layers": 2, "num_attention_heads": 4,
                                        "max_position_embeddings": 64, "eos_token_id": VOCAB - 1,
                                        "bos_token_id": VOCAB - 1, **CASES[case]})
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    return perturbed(model, noise)



@pytest.fixture(params=list(CASES))
def case_dir(request, tmp_path):
    make_hf(request.param).save_pretrained(tmp_path / "hf")
    return request.param, tmp_path / "hf"


def test_load_parity_round_trip_and_old_key_names(case_dir, tmp_path):
    _, folder = case_dir
    hf, ours = transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), load_model(folder).eval()
    idx = random_tokens(seq=40)
    assert (logits_of(hf, idx) - logits_of(ours, idx)).abs().max().item() <= 1e-4
    assert [s.name for s in ours.site_layout()] == list(ours.norm_sites())
    save_model(ours, tmp_path / "again")
    assert (logits_of(load_model(tmp_path / "again"), idx) - logits_of(ours, idx)).abs().max().item() == 0
    # transformers (and the hub's Pythia checkpoints) name the head `embed_out`; older checkpoints also keep rotary
    # and mask buffers, and ours write `lm_head`: all read the same
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    assert "embed_out.weight" in state
    state["lm_head.weight"] = state.pop("embed_out.weight")
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(3)
    save_file(state, folder / "model.safetensors")
    assert (logits_of(load_model(folder), idx) - logits_of(ours, idx)).abs().max().item() == 0


def test_fold_is_exact_with_distinct_path_sigmas(case_dir):
    _, folder = case_dir
    model = frozen_with_distinct_sigmas(folder)
    folded = model.fold().eval()
    assert not folded.has_normalization and folded.lm_head.bias is not None
    idx = random_tokens(seq=40, seed=3)
    assert (logits_of(model, idx) - logits_of(folded, idx)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fmt", ["hf", "hf-compat"])
def test_exports_reload_with_parity_and_verify_passes(case_dir, tmp_path, fmt):
    _, folder = case_dir
    model = frozen_with_distinct_sigmas(folder)
    save_model(model.fold(), tmp_path / "folded")
    result = export_model(tmp_path / "folded", tmp_path / "out", fmt)
    assert result.max_abs <= PARITY_TOL[fmt]
    arch = json.loads((tmp_path / "out" / "config.json").read_text())["architectures"][0]
    assert arch == ("LNFree" if fmt == "hf" else "") + "GPTNeoXForCausalLM"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    idx = random_tokens(seq=40, seed=4)
    assert (logits_of(reloaded, idx) - logits_of(model, idx)).abs().max().item() <= 1e-4
    if fmt == "hf":
        report = verify(tmp_path / "out")
        assert report.passed, report.failures
        assert report.dla_max_abs_error <= 1e-10


def test_transformer_lens_and_nnsight_read_the_norm_free_model(tmp_path):
    make_hf("pythia-parallel").save_pretrained(tmp_path / "hf")
    interop_reads_the_folded_model(tmp_path / "hf", tmp_path)


def test_a_short_removal_run_ends_norm_free_and_verified(tmp_path):
    arch = removal_run_ends_verified(make_hf("pythia-parallel", noise=0.02), tmp_path, "lnfree")
    assert arch == "LNFreeGPTNeoXForCausalLM"
