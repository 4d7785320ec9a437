"""TransformerLens 4.3 `TransformerBridge` and nnsight around the norm-free model, against the real libraries."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import random_tokens
from lnfree.export.core import load_norm_free
from lnfree.interop import to_nnsight, to_transformer_lens
from lnfree.models import load_model, save_model
from test_export import frozen_model, make_dirs

TOL = 1e-4
# Our cache names that TransformerLens uses for the same activation.
SHARED_HOOKS = ("hook_embed", "hook_pos_embed", "blocks.{i}.hook_resid_pre", "blocks.{i}.attn.hook_z",
                "blocks.{i}.hook_attn_out", "blocks.{i}.hook_resid_mid", "blocks.{i}.hook_mlp_out",
                "blocks.{i}.hook_resid_post", "ln_final.hook_normalized")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_dirs(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def bridge_run(dirs):
    bridge = to_transformer_lens(dirs["folded"])
    model = load_norm_free(dirs["folded"]).model
    idx = random_tokens(batch=2, seq=20, seed=3)
    ours: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        expected = model(idx, cache=ours)
        logits, cache = bridge.run_with_cache(idx)
    return bridge, model, expected, ours, logits, cache


def test_bridge_logits_and_standard_hooks_match_our_model(bridge_run):
    bridge, model, expected, ours, logits, cache = bridge_run
    assert (logits - expected).abs().max().item() <= TOL
    for pattern in SHARED_HOOKS:
        for i in range(model.config.n_layer):
            name = pattern.format(i=i)
            assert (cache[name] - ours[name]).abs().max().item() <= TOL, name


def test_bridge_norm_hooks_are_identities(bridge_run):
    bridge, model, _, _, _, cache = bridge_run
    L = model.config.n_layer
    for i in range(L):
        assert torch.equal(cache[f"blocks.{i}.ln1.hook_normalized"], cache[f"blocks.{i}.hook_resid_pre"])
        assert torch.equal(cache[f"blocks.{i}.ln2.hook_normalized"], cache[f"blocks.{i}.hook_resid_mid"])
        assert torch.all(cache[f"blocks.{i}.ln1.hook_scale"] == 1)
    assert torch.equal(cache["ln_final.hook_normalized"], cache[f"blocks.{L - 1}.hook_resid_post"])
    assert not [n for n, m in bridge.original_model.named_modules() if isinstance(m, torch.nn.LayerNorm)]


def test_bridge_decompositions_sum_to_the_residual_and_the_logits(bridge_run):
    bridge, model, _, _, logits, cache = bridge_run
    L = model.config.n_layer
    final = cache[f"blocks.{L - 1}.hook_resid_post"]
    W_U, b_U = bridge.W_U, bridge.b_U  # (D, V), (V,)

    parts = cache.decompose_resid(apply_ln=True)  # embed, pos_embed, attn_out and mlp_out of every layer
    assert parts.shape[0] == 2 + 2 * L
    assert (parts.sum(0) - final).abs().max().item() <= TOL
    assert (torch.einsum("nbtd,dv->btv", parts, W_U) + b_U - logits).abs().max().item() <= TOL

    acc = cache.accumulated_resid(apply_ln=True)  # logit lens: the last entry is the final residual
    assert (acc[-1] @ W_U + b_U - logits).abs().max().item() <= TOL

    heads = cache.stack_head_results(apply_ln=True)  # (L·H, B, T, D)
    assert heads.shape[0] == L * model.config.n_head
    mlps = sum(cache[f"blocks.{i}.hook_mlp_out"] for i in range(L))
    b_O = sum(bridge.blocks[i].attn.b_O for i in range(L))
    rebuilt = heads.sum(0) + mlps + b_O + cache["hook_embed"] + cache["hook_pos_embed"]
    assert (rebuilt - final).abs().max().item() <= TOL
    head_logits = torch.einsum("nbtd,dv->btv", heads, W_U)
    rest = (mlps + b_O + cache["hook_embed"] + cache["hook_pos_embed"]) @ W_U + b_U
    assert (head_logits + rest - logits).abs().max().item() <= TOL


def test_bridge_loads_a_published_eps_1e12_model_through_our_loader(dirs):
    bridge = to_transformer_lens(dirs["published"])  # read as frozen sites, folded, then bridged
    idx = random_tokens(batch=2, seq=20, seed=4)
    published = transformers.GPT2LMHeadModel.from_pretrained(dirs["published"]).eval()
    with torch.no_grad():
        assert (bridge(idx) - published(idx).logits).abs().max().item() <= TOL
    assert not [n for n, m in bridge.original_model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    cache = bridge.run_with_cache(idx)[1]
    assert torch.all(cache["blocks.0.ln1.hook_scale"] == 1)


def test_bridge_from_a_model_object_folds_it_and_takes_a_tokenizer_folder(dirs):
    model = frozen_model(dirs["ln"])  # all sites frozen, not yet folded
    bridge = to_transformer_lens(model, tokenizer=dirs["ln"])
    idx = random_tokens(batch=1, seq=12, seed=8)
    with torch.no_grad():
        assert (bridge(idx) - model(idx)).abs().max().item() <= TOL
    assert bridge.to_tokens("w1 w2", prepend_bos=False).tolist() == [[1, 2]]


def test_interop_refuses_live_layernorm_and_missing_tokenizer(tmp_path, dirs):
    with pytest.raises(ValueError, match="still live") as e:
        to_transformer_lens(load_model(dirs["ln"]), tokenizer=dirs["ln"])
    assert "\n" not in str(e.value)
    save_model(load_norm_free(dirs["folded"]).model, tmp_path / "bare")  # no tokenizer files
    with pytest.raises(ValueError, match="no tokenizer"):
        to_nnsight(tmp_path / "bare")


# ---- nnsight ----------------------------------------------------------------------------------------------------
def test_nnsight_trace_reads_and_edits_the_residual_like_an_hf_hook(dirs):
    lm = to_nnsight(dirs["folded"])
    model = load_norm_free(dirs["folded"]).model
    idx = random_tokens(batch=1, seq=16, seed=9)
    layer, pos = 0, 5
    delta = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0))

    with lm.trace(idx):
        resid = lm.transformer.h[layer].output.save()
        clean = lm.lm_head.output.save()
    with lm.trace(idx):
        lm.transformer.h[layer].output[:, pos] += delta
        edited = lm.lm_head.output.save()

    ours: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        expected = model(idx, cache=ours)
    assert (resid - ours[f"blocks.{layer}.hook_resid_post"]).abs().max().item() <= TOL
    assert (clean - expected).abs().max().item() <= TOL

    # The same edit as a plain transformers forward hook predicts the edited logits.
    hf = transformers.AutoModelForCausalLM.from_pretrained(dirs["folded"]).eval()

    def add_delta(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, pos] += delta

    handle = hf.transformer.h[layer].register_forward_hook(add_delta)
    with torch.no_grad():
        predicted = hf(idx).logits
    handle.remove()
    assert (edited - predicted).abs().max().item() <= TOL
    assert torch.allclose(edited[:, :pos], clean[:, :pos], atol=TOL)  # causal: earlier positions unchanged
    assert (edited[:, pos:] - clean[:, pos:]).abs().max().item() > 1e-2
