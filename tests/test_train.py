"""The fine-tuning run: both modes on one data order, exact resume after SIGKILL, EOT targets, aux loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_hf_gpt2
from lnfree.config import TrainConfig
from lnfree.train import TrainingDiverged, _guard, aux_std_loss, lr_at, next_token_loss

CTX = 32
RUN_ARGS = ["--steps", "12", "--batch-tokens", str(4 * CTX), "--micro-batch", "2", "--ctx", str(CTX),
            "--checkpoint-every", "3", "--warmup", "2", "--quiet"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A local text corpus, a BPE tokenizer trained on it, and a random GPT-2 folder with that tokenizer."""
    from lnfree.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("setup")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(os.__file__).parent
    for i, name in enumerate(["json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "glob.py"]):
        (corpus / f"doc{i}.txt").write_text((stdlib / name).read_text())
    tok = train_bpe_tokenizer(sorted(corpus.iterdir()), 300, root / "tok")
    hf = make_hf_gpt2(n_layer=2, n_head=2, n_embd=32, vocab=len(tok), n_positions=CTX, noise=0.02)
    hf.config.eos_token_id = hf.config.bos_token_id = tok.eos_token_id
    model_dir = root / "model"
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return {"corpus": corpus, "model": model_dir, "cache": root / "cache", "root": root}


def _remove(setup, out, *extra, check=True):
    cmd = [sys.executable, "-m", "lnfree.cli", "remove", str(setup["model"]), "--data", str(setup["corpus"]),
           "--out", str(out), "--cache-dir", str(setup["cache"]), *RUN_ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_lnfree_and_control_share_the_data_order(tiny_setup, tmp_path):
    lnfree, control = tmp_path / "lnfree", tmp_path / "control"
    out = _remove(tiny_setup, lnfree, "--preset", "baroni2025")
    assert "rescaled from the preset's" in out.stdout  # 12 steps instead of the preset's length
    _remove(tiny_setup, control, "--control")
    a, b = _losses(lnfree), _losses(control)
    assert len(a) == len(b) == 12
    assert a[0] == b[0]  # step 0: nothing frozen yet, same model, same batch
    assert a[-1] != b[-1]  # the LN-free run diverges from the control once sites freeze
    rows = [json.loads(line) for line in (lnfree / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["frozen_sites"] == rows[-1]["n_sites"] == 7
    assert {"step", "loss", "lr", "tokens", "frozen_sites"} <= rows[0].keys()
    assert any("events" in r for r in rows)
    # the same sequences were drawn: the data cursors agree
    cursor = lambda d: json.loads(next((d / "checkpoints").glob("step_*/state.json")).read_text())["data"]
    assert cursor(lnfree) == cursor(control)
    # outputs: a folded, norm-free transformers checkpoint; the control keeps its LNs; a loss plot
    assert json.loads((lnfree / "final" / "config.json").read_text())["architectures"] == ["LNFreeGPT2LMHeadModel"]
    assert json.loads((control / "final" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    # the LN-free plot is redrawn when its control finishes, so it shows both curves
    assert (lnfree / "loss.png").stat().st_mtime >= (control / "metrics.jsonl").stat().st_mtime
    assert (lnfree / "final" / "tokenizer.json").exists()


def test_sigkill_then_resume_repeats_the_losses_exactly(tiny_setup, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _remove(tiny_setup, ref)
    cmd = [sys.executable, "-m", "lnfree.cli", "remove", str(tiny_setup["model"]), "--data",
           str(tiny_setup["corpus"]), "--out", str(killed), "--cache-dir", str(tiny_setup["cache"]), *RUN_ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) < 12, "the run finished before it could be killed"
    _remove(tiny_setup, killed, "--resume")
    assert _losses(killed) == _losses(ref)  # bitwise, per step


def test_resume_without_checkpoint_is_a_one_line_error(tiny_setup, tmp_path):
    out = _remove(tiny_setup, tmp_path / "none", "--resume", check=False)
    assert out.returncode == 2 and "no checkpoint" in out.stderr and out.stderr.count("\n") == 1


def test_batch_tokens_must_fill_micro_batches():
    cfg = TrainConfig(batch_tokens=1000, micro_batch=2, ctx=32)
    with pytest.raises(ValueError, match="nearest valid: 960 or 1024"):
        cfg.sequences_per_step()


def test_eot_targets_count_in_the_loss():
    torch.manual_seed(0)
    idx = torch.randint(0, 10, (2, 8))
    idx[:, 4] = 9  # EOT as a target at position 4
    logits = torch.randn(2, 8, 10)
    direct = F.cross_entropy(logits[:, :-1].reshape(-1, 10), idx[:, 1:].reshape(-1))
    assert torch.allclose(next_token_loss(logits, idx), direct)
    pushed = logits.clone()
    pushed[:, 3, 9] += 5.0  # predicting EOT better must lower the loss
    assert next_token_loss(pushed, idx) < next_token_loss(logits, idx)


def test_aux_loss_and_gradient_match_direct_computation():
    torch.manual_seed(0)
    std = (torch.rand(2, 6) + 0.5).requires_grad_()
    eot = torch.zeros(2, 6, dtype=torch.bool)
    eot[1, 3] = True
    loss = aux_std_loss(std, eot)
    loss.backward()
    # direct: σ̄ over positions ≠ 0 and not EOT, treated as a constant
    vals = [std[b, t].item() for b in range(2) for t in range(6) if t != 0 and not eot[b, t]]
    sigma_bar = sum(vals) / len(vals)
    expected = sum((std[b, t].item() - sigma_bar) ** 2 for b in range(2) for t in range(6)) / 12
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    expected_grad = 2 * (std.detach() - sigma_bar) / 12
    assert torch.allclose(std.grad, expected_grad, atol=1e-7)


def test_lr_warmup_and_cosine_floor():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_spike_guard():
    cfg = TrainConfig(spike_factor=10.0)
    _guard(3.0, [3.0] * 20, cfg, 5, None)
    with pytest.raises(TrainingDiverged, match="not finite"):
        _guard(float("nan"), [], cfg, 5, None)
    with pytest.raises(TrainingDiverged, match="last good checkpoint: ckpt"):
        _guard(31.0, [3.0] * 20, cfg, 5, Path("ckpt"))


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, hf_gpt2_dir):
    import errno

    import lnfree.checkpoint as ck
    from lnfree.models import load_model

    model = load_model(hf_gpt2_dir)
    opt = torch.optim.AdamW(model.parameters())
    state = ck.RunState(step=3, train={}, schedule={}, data={"i": 1}, model_config={}, family="gpt2",
                        history=[], extra={})
    first = ck.save_checkpoint(tmp_path, model, opt, state)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", no_space)
    with pytest.raises(OSError, match="previous checkpoint is intact"):
        ck.save_checkpoint(tmp_path, model, opt, ck.RunState(**{**state.__dict__, "step": 6}))
    assert ck.latest_checkpoint(tmp_path) == first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]  # no temp folder left
