"""Our GPT-2 against transformers' GPT2LMHeadModel: logits, round trips, bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import make_hf_gpt2, random_tokens
from lnfree.models import load_model, save_model


@pytest.mark.parametrize("n_layer,n_head,n_embd", [(1, 1, 16), (2, 4, 48), (3, 6, 90), (4, 8, 64), (2, 3, 60)])
def test_logits_match_transformers(tmp_path, n_layer, n_head, n_embd):
    hf = make_hf_gpt2(n_layer=n_layer, n_head=n_head, n_embd=n_embd, seed=n_layer)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    idx = random_tokens()
    with torch.no_grad():
        err = (hf(idx).logits - ours(idx)).abs().max().item()
    assert err <= 1e-4, err


def test_save_load_round_trip_is_identical(tmp_path, hf_gpt2_dir):
    model = load_model(hf_gpt2_dir).eval()
    save_model(model, tmp_path / "out")
    again = load_model(tmp_path / "out").eval()
    idx = random_tokens()
    with torch.no_grad():
        assert torch.equal(model(idx), again(idx))
    # the written folder is a plain GPT2LMHeadModel that transformers loads by itself
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max().item() <= 1e-4


def test_pytorch_bin_checkpoint_loads(tmp_path):
    # Older hub checkpoints ship only pytorch_model.bin; it is read with torch.load(weights_only=True).
    hf = make_hf_gpt2()
    hf.config.to_json_file(tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = load_model(tmp_path).eval()
    idx = random_tokens()
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() <= 1e-4


def test_unsupported_architecture_names_found_and_supported(tmp_path, hf_gpt2_dir):
    cfg = json.loads((hf_gpt2_dir / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (hf_gpt2_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MambaForCausalLM.*supported: .*GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(hf_gpt2_dir)
    # a config that names a supported architecture but is not one is refused, never built from defaults
    cfg["architectures"] = ["LlamaForCausalLM"]
    (hf_gpt2_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks hidden_size, intermediate_size, num_hidden_layers"):
        load_model(hf_gpt2_dir)


def test_shape_mismatch_is_one_line_error(hf_gpt2_dir):
    cfg = json.loads((hf_gpt2_dir / "config.json").read_text())
    cfg["n_embd"] = 64
    (hf_gpt2_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch") as e:
        load_model(hf_gpt2_dir)
    assert "\n" not in str(e.value)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(make_hf_gpt2().config.to_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path)


def test_frozen_model_refuses_plain_save(tmp_path, hf_gpt2_dir):
    model = load_model(hf_gpt2_dir)
    next(iter(model.norm_sites().values())).frozen.fill_(True)
    with pytest.raises(ValueError, match="fold"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cache_uses_transformer_lens_names(hf_gpt2_dir):
    model = load_model(hf_gpt2_dir).eval()
    cache = {}
    with torch.no_grad():
        logits = model(random_tokens(), cache=cache)
    for name in ("hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid",
                 "blocks.1.attn.hook_z", "blocks.1.hook_resid_post", "ln_final.hook_normalized"):
        assert name in cache
    assert torch.allclose(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    # resid_post = resid_mid + mlp_out, and the unembedding of ln_final gives the logits
    assert torch.allclose(cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"],
                          cache["blocks.1.hook_resid_post"])
    assert torch.allclose(cache["ln_final.hook_normalized"] @ model.wte.weight.T, logits, atol=1e-5)


def test_published_ln_free_convention_is_read_as_frozen_sites(tmp_path):
    """A GPT2LMHeadModel saved with eps=1e12 and LN weights ×1e6/σ̂ (apollo-research/gpt2_noLN,
    schaeff/gpt2-*_LNFree*) loads as every site frozen at σ̂ = 1e6; its fold equals transformers' logits."""
    hf = make_hf_gpt2()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.mul_(1e6 / 3.0)  # γ/σ̂ with σ̂ = 3, times 1e6
    hf.config.layer_norm_epsilon = 1e12
    hf.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = load_model(tmp_path).eval()
    assert all(s.is_frozen and s.sigma.item() == 1e6 for s in model.norm_sites().values())
    folded = model.fold().eval()
    idx = random_tokens()
    with torch.no_grad():
        ref = hf(idx).logits
        assert (ref - model(idx)).abs().max().item() <= 1e-4
        assert (ref - folded(idx)).abs().max().item() <= 1e-4


def test_attention_pattern_matches_transformers(tmp_path):
    hf = make_hf_gpt2(n_layer=2, n_head=4, n_embd=48)
    hf.config._attn_implementation = "eager"  # transformers returns attention weights from the eager path
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path).eval()
    idx = random_tokens()
    cache = {}
    with torch.no_grad():
        model(idx, cache=cache)
        attentions = hf(idx, output_attentions=True).attentions
    for i, ref in enumerate(attentions):
        assert torch.allclose(cache[f"blocks.{i}.attn.hook_pattern"], ref, atol=1e-5)


def test_untied_lm_head_is_refused(tmp_path, hf_gpt2_dir):
    from safetensors.torch import load_file, save_file

    state = load_file(hf_gpt2_dir / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0
    save_file(state, hf_gpt2_dir / "model.safetensors")
    with pytest.raises(ValueError, match="untied lm_head"):
        load_model(hf_gpt2_dir)


@pytest.mark.parametrize("where", ["embd", "attn", "resid"])
def test_dropout_sits_where_transformers_puts_it(tmp_path, where):
    """Dropout with p = 1 is deterministic (it zeroes), so one placement at a time can be compared with
    transformers' GPT-2 in training mode; in evaluation mode dropout is off."""
    hf = make_hf_gpt2(n_layer=2)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).train()
    cfg = hf.config
    cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop = (float(where == k) for k in ("embd", "attn", "resid"))
    dropping = transformers.GPT2LMHeadModel(cfg)
    dropping.load_state_dict(hf.state_dict())
    dropping.train()
    modules = {"embd": [ours], "attn": [b.attn for b in ours.h], "resid": [m for b in ours.h for m in (b, b.mlp)]}
    for module in modules[where]:
        module.dropout_p = 1.0
    idx = random_tokens()
    with torch.no_grad():
        expected, got = dropping(idx).logits, ours(idx)
        assert (expected - hf.eval()(idx).logits).abs().max() > 1e-2  # the placement matters
        assert (got - expected).abs().max().item() <= 1e-5
        ours.set_dropout(0.5)
        assert torch.equal(ours.eval()(idx), ours(idx))  # evaluation forwards never drop


def test_site_layout_names_every_site_in_forward_order(hf_gpt2_dir):
    model = load_model(hf_gpt2_dir)
    layout = model.site_layout()
    assert [s.name for s in layout] == list(model.norm_sites())
    assert [s.kind for s in layout[:3]] == ["ln1qk", "ln1v", "ln2"] and layout[-1].kind == "ln_final"
    assert (model.n_layers, model.context_length, model.eos_token_ids) == (2, 64, (100,))


def test_several_end_of_text_ids_all_mark_eot(hf_gpt2_dir):
    model = load_model(hf_gpt2_dir)
    model.config.eos_token_id = [100, 7]  # Llama 3 style
    idx = torch.tensor([[3, 7, 100, 5]])
    assert model.eot_mask(idx).tolist() == [[False, True, True, False]]
    model.config.eos_token_id = None
    assert model.eot_mask(idx) is None
