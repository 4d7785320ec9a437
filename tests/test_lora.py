"""`--lora`: a rank-R update on peft adapters, checkpoints without the base weights, an exact resume, and a merged
model that folds and verifies like any other."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_hf_gpt2, random_tokens, rewind_copy
from lnfree.method.calibrate import apply_site_states, calibrate
from lnfree.method.schedule import SiteState
from lnfree.models import load_model
from lnfree.run.lora import add_adapters, merge_adapters

pytest.importorskip("peft")

CTX = 32
RUN = ["--preset", "baroni2025", "--steps", "12", "--batch-tokens", str(4 * CTX), "--micro-batch", "2", "--ctx",
       str(CTX), "--checkpoint-every", "3", "--keep-checkpoints", "10", "--warmup", "2", "--quiet"]


def _remove(setup, out, *extra, check=True):
    cmd = [sys.executable, "-m", "lnfree.cli", "remove", str(setup["model"]), "--data", str(setup["corpus"]),
           "--out", str(out), "--cache-dir", str(setup["cache"]), *RUN, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_run(tiny_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    _remove(tiny_setup, out, "--lora", "2", "--lora-trainable", "none")
    return out


def test_a_lora_run_changes_each_map_by_a_low_rank_update_and_checkpoints_no_base_weight(tiny_setup, lora_run):
    saved = load_file(lora_run / "checkpoints" / "step_00000012" / "model.safetensors")
    assert any(".lora_A." in k for k in saved) and any(".lora_B." in k for k in saved)
    assert not any("base_layer" in k or k.endswith("c_fc.weight") for k in saved)  # no frozen base weight
    assert not any(k.endswith("ln_1.weight") for k in saved)  # --lora-trainable none: the gains are frozen too
    base, final = load_model(tiny_setup["model"]), load_model(lora_run / "final")
    assert not final.has_normalization
    before, after = base.state_dict(), final.state_dict()
    # c_proj reads no norm, so the fold leaves it as trained: base + B·A, rank 2 (beyond fp32 rounding), not zero
    delta = (after["h.1.mlp.c_proj.weight"] - before["h.1.mlp.c_proj.weight"]).double()
    singular = torch.linalg.svdvals(delta)
    assert singular[0] > 1e-4 and singular[2] < 1e-5 * singular[0]
    assert torch.equal(after["wpe.weight"], before["wpe.weight"])  # not adapted, not trainable


def test_a_lora_run_folds_to_a_model_verify_passes(lora_run):
    out = subprocess.run([sys.executable, "-m", "lnfree.cli", "verify", str(lora_run)], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "PASS" in out.stdout, out.stdout + out.stderr


def test_a_lora_run_resumes_exactly_from_a_checkpoint_without_base_weights(tiny_setup, lora_run, tmp_path):
    resumed = rewind_copy(lora_run, tmp_path / "resumed")
    _remove(tiny_setup, resumed, "--lora", "2", "--lora-trainable", "none", "--resume")
    assert _losses(resumed) == _losses(lora_run)  # bitwise, per step
    a, b = load_file(lora_run / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unfinished_lora_run_loads_merged_from_its_checkpoint(tiny_setup, lora_run, tmp_path):
    from lnfree.sources import load_source

    unfinished = tmp_path / "unfinished"
    shutil.copytree(lora_run, unfinished)
    shutil.rmtree(unfinished / "final")
    model, _ = load_source(unfinished, unfinished_runs=True)
    assert not any("lora" in name for name, _ in model.named_parameters())
    folded = model.fold().eval()
    final = load_model(lora_run / "final").eval()
    idx = random_tokens(batch=2, seq=CTX, vocab=final.vocab_size)
    with torch.no_grad():
        assert (folded(idx) - final(idx)).abs().max().item() < 1e-5


def test_packed_projections_read_through_their_adapters(tmp_path):
    """GPT-2 slices c_attn's rows when Q/K and V read different norm outputs: the adapter must be in the slice."""
    make_hf_gpt2(n_layer=2, n_head=2, n_embd=32, n_positions=CTX).save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m")
    idx = random_tokens(batch=2, seq=CTX)
    calibrate(model, [idx])
    apply_site_states(model, {"blocks.0.ln1.qk": SiteState(True, 0.0, 0.0)})  # Q/K frozen, V live: two inputs
    add_adapters(model, rank=2, alpha=4.0, targets="c_attn", trainable="none", seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)  # B starts at zero; give the update a value to lose
        adapted = model.eval()(idx)
        merged = merge_adapters(model)(idx)
    assert (adapted - merged).abs().max().item() < 1e-5
    assert (adapted - load_model(tmp_path / "m").eval()(idx)).abs().max().item() > 1e-2


def test_bad_lora_settings_are_one_line_errors(tiny_setup, tmp_path):
    out = _remove(tiny_setup, tmp_path / "a", "--lora", "2", "--lora-targets", "q_proj", check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "--lora-targets 'q_proj'" in out.stderr and "c_attn" in out.stderr  # names the maps there are
    out = _remove(tiny_setup, tmp_path / "b", "--lora", "2", "--lora-trainable", "gains", check=False)
    assert out.returncode == 2 and "norms, biases, embeddings" in out.stderr and out.stderr.count("\n") == 1
