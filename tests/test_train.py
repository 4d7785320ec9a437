"""The fine-tuning run: both modes on one data order, exact resume after SIGKILL, EOT targets, aux loss."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import make_hf_gpt2
from lnfree.method.aux import aux_std_loss
from lnfree.run.config import TrainConfig
from lnfree.run.step import next_token_loss
from lnfree.run.train import TrainingDiverged, _guard

CTX = 32
RUN_ARGS = ["--steps", "12", "--batch-tokens", str(4 * CTX), "--micro-batch", "2", "--ctx", str(CTX),
            "--checkpoint-every", "3", "--warmup", "2", "--quiet"]


# A preset whose 12 steps keep sites live, freezes pending and specials weighted past the kill point (step 7;
# the resume starts from the checkpoint at 6), with every kind of state a resume must restore: per-call EMA with
# shared ln_1 σ̂ ($LNFREE_TEST_EMA=step: per step), position-0 and EOT specials eased out, dropout, the auxiliary loss,
# distillation from the original (which a resume must load as the original, not as the checkpoint's model).
_LIVE_PRESET = """
import os, sys
from lnfree.run import recipes
from lnfree.run.config import Recipe, TrainConfig
from lnfree.method.schedule import SITE_KINDS, RemovalSpec
from lnfree.method.sigma import SigmaRule
spec = RemovalSpec(start=3, gaps={"ln2": 1, "ln1qk": 1, "ln1v": 1}, eot_after=1, bos_after=1, tail=1,
                   eot_kinds=SITE_KINDS, bos_kinds=SITE_KINDS, eot_ramp=1, bos_ramp=2)
rule = SigmaRule(ema=os.environ.get("LNFREE_TEST_EMA", "call"), momentum=0.5, v_reads=2, tracking="norm")
recipes.PRESETS["live"] = lambda n: Recipe("live", spec, TrainConfig(steps=12, dropout=0.1, aux_weight=0.1,
                                                                                 distill_weight=0.5), rule)
from lnfree.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _remove_cmd(setup, out, *extra, preset="baroni2025"):
    head = [sys.executable, "-c", _LIVE_PRESET] if preset == "live" else [sys.executable, "-m", "lnfree.cli"]
    return [*head, "remove", str(setup["model"]), "--data", str(setup["corpus"]), "--out", str(out),
            "--cache-dir", str(setup["cache"]), "--preset", preset, *RUN_ARGS, *extra]


def _remove(setup, out, *extra, check=True, preset="baroni2025"):
    return subprocess.run(_remove_cmd(setup, out, *extra, preset=preset), capture_output=True, text=True,
                          check=check)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_lnfree_and_control_share_the_data_order(tiny_setup, tmp_path):
    lnfree, control = tmp_path / "lnfree", tmp_path / "control"
    out = _remove(tiny_setup, lnfree, "--preset", "baroni2025")
    assert "rescaled from the preset's" in out.stdout  # 12 steps instead of the preset's length
    _remove(tiny_setup, control, "--control", "--distill-weight", "0.5")
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
    # the control is the same run without removal and without the auxiliary and distillation losses, which belong
    # to the removal
    train = lambda d: json.loads((d / "run.json").read_text())["train"]
    assert train(lnfree)["aux_weight"] == 0.1 and train(control)["aux_weight"] == 0.0
    assert train(control)["distill_weight"] == 0.0
    assert "distill_loss" not in json.loads((control / "metrics.jsonl").read_text().splitlines()[0])


def test_sigkill_while_sites_are_live_then_resume_repeats_the_run_exactly(tiny_setup, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _remove(tiny_setup, ref, preset="live")
    schedule = json.loads((ref / "run.json").read_text())["schedule"]
    assert min(schedule["freeze_at"].values()) < 6 < max(schedule["freeze_at"].values())  # live at the resume
    assert min(schedule["bos_off"].values()) > 6
    proc = subprocess.Popen(_remove_cmd(tiny_setup, killed, preset="live"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) < 12, "the run finished before it could be killed"
    _remove(tiny_setup, killed, "--resume", preset="live")
    assert _losses(killed) == _losses(ref)  # bitwise, per step
    a, b = load_file(ref / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same final model, bitwise


def test_final_model_is_the_fold_of_the_last_checkpoint(tiny_setup, tmp_path):
    from lnfree.models import load_model
    from lnfree.run.checkpoint import latest_checkpoint, load_checkpoint

    _remove(tiny_setup, tmp_path / "run", preset="live")
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_00000012"
    trained, _ = load_checkpoint(ckpt)
    final = load_model(tmp_path / "run" / "final").eval()
    assert not final.has_normalization
    idx = torch.randint(0, 300, (2, CTX), generator=torch.Generator().manual_seed(0))
    idx[:, 5] = final.config.eos_token_id
    with torch.no_grad():
        assert (trained.eval()(idx) - final(idx)).abs().max().item() <= 1e-5


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


def test_spike_guard():
    cfg = TrainConfig(spike_factor=10.0)
    _guard(3.0, [3.0] * 20, cfg, 5, None)
    with pytest.raises(TrainingDiverged, match="not finite"):
        _guard(float("nan"), [], cfg, 5, None)
    with pytest.raises(TrainingDiverged, match="last good checkpoint: ckpt"):
        _guard(31.0, [3.0] * 20, cfg, 5, Path("ckpt"))
    # a finite CE beside a NaN gradient (lnfree-uniform on SmolLM2, step 176: CE 10.7, aux and grad norm NaN)
    with pytest.raises(TrainingDiverged, match="gradient norm not finite .*not applied"):
        _guard(10.7, [3.0] * 20, cfg, 5, None, None, {"gradient norm": float("nan"), "auxiliary loss": 0.1})


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, hf_gpt2_dir):
    import errno

    import lnfree.run.checkpoint as ck
    from lnfree.models import load_model

    model = load_model(hf_gpt2_dir)
    opt = torch.optim.AdamW(model.parameters())
    state = ck.RunState(step=3, data={"i": 1}, model_config={}, family="gpt2",
                        history=[])
    first = ck.save_checkpoint(tmp_path, model, opt, state)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", no_space)
    with pytest.raises(OSError, match="previous checkpoint is intact"):
        ck.save_checkpoint(tmp_path, model, opt, ck.RunState(**{**state.__dict__, "step": 6}))
    assert ck.latest_checkpoint(tmp_path) == first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]  # no temp folder left


# ---- command-line errors: one line, exit 2, nothing lost -------------------------------------------------------
def _one_line_error(out, *needles):
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("lnfree: error:"), out.stderr  # no bars, no traceback
    for needle in needles:
        assert needle in out.stderr, out.stderr


def test_remove_refuses_bad_models_and_data(tiny_setup, tmp_path):
    from lnfree.method.calibrate import apply_site_states
    from lnfree.method.schedule import SiteState
    from lnfree.models import load_model, save_model
    from lnfree.tokenizer import load_tokenizer

    model = load_model(tiny_setup["model"])
    apply_site_states(model, {n: SiteState(True, 0.0, 0.0) for n in model.norm_sites()})
    save_model(model.fold(), tmp_path / "folded", tokenizer_from=tiny_setup["model"])
    folded = dict(tiny_setup, model=tmp_path / "folded")
    _one_line_error(_remove(folded, tmp_path / "a", check=False), "has no live LayerNorm")
    _one_line_error(_remove(tiny_setup, tmp_path / "b", "--ctx", "64", check=False),
                    "--ctx 64 exceeds the model's context of 32")
    tok = load_tokenizer(tiny_setup["model"])
    small = make_hf_gpt2(n_layer=1, n_head=2, n_embd=32, vocab=len(tok) - 10, n_positions=CTX)
    small.save_pretrained(tmp_path / "small")
    tok.save_pretrained(tmp_path / "small")
    _one_line_error(_remove(dict(tiny_setup, model=tmp_path / "small"), tmp_path / "c", check=False),
                    f"tokenizer has {len(tok)} tokens but the model's vocabulary is {len(tok) - 10}")
    (tmp_path / "tiny_corpus").mkdir()
    (tmp_path / "tiny_corpus" / "a.txt").write_text("x = 1\n")
    _one_line_error(_remove(dict(tiny_setup, corpus=tmp_path / "tiny_corpus"), tmp_path / "d", check=False),
                    "has only 0 sequences of 32 tokens")
    assert not any((tmp_path / d / "checkpoints").exists() for d in "abcd")


def test_divergence_stops_with_exit_2_and_the_last_checkpoint_intact(tiny_setup, tmp_path):
    from lnfree.run.checkpoint import latest_checkpoint, load_checkpoint

    out = _remove(tiny_setup, tmp_path / "run", "--lr", "inf", "--checkpoint-every", "1", check=False)
    _one_line_error(out, "not finite", "last good checkpoint:")
    ckpt = latest_checkpoint(tmp_path / "run")
    assert f"last good checkpoint: {ckpt})" in out.stderr
    _, state = load_checkpoint(ckpt)  # complete and loadable; the diverged step wrote nothing after it
    assert len(_losses(tmp_path / "run")) == state.step and f"step {state.step}: loss nan" in out.stderr
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_pretrain_and_demo_errors_are_one_line(tiny_setup, tmp_path):
    pretrain = lambda *a: subprocess.run([sys.executable, "-m", "lnfree.cli", "pretrain", *a, "--quiet"],
                                         capture_output=True, text=True)
    (tmp_path / "tiny_corpus").mkdir()
    (tmp_path / "tiny_corpus" / "a.txt").write_text("x = 1\n")
    _one_line_error(pretrain("--tokenizer", str(tiny_setup["model"]), "--data", str(tmp_path / "tiny_corpus"),
                             "--out", str(tmp_path / "p"), "--ctx", "32", "--cache-dir", str(tiny_setup["cache"])),
                    "has only 0 sequences")
    _one_line_error(pretrain("--tokenizer", str(tmp_path / "missing"), "--data", str(tiny_setup["corpus"]),
                             "--out", str(tmp_path / "q")), "missing")
    demo = subprocess.run([sys.executable, "-m", "lnfree.cli", "demo", "--quick", "--hard", "--out",
                           str(tmp_path / "demo")], capture_output=True, text=True)
    _one_line_error(demo, "--quick and --hard are exclusive")
    assert not (tmp_path / "demo").exists()


def test_weight_decay_groups_follow_each_code(hf_gpt2_dir):
    """nanoGPT decays tensors with dim >= 2; transformers' Trainer decays every parameter outside nn.LayerNorm
    modules except biases — and the 2025 code's FakeLayerNorm is no nn.LayerNorm, so its gains are decayed."""
    from transformers.trainer_pt_utils import get_parameter_names

    from lnfree.models import load_model
    from lnfree.run.step import make_optimizer

    model = load_model(hf_gpt2_dir)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = lambda opt: {names[id(p)] for p in opt.param_groups[0]["params"]}
    nanogpt = make_optimizer(model, TrainConfig(decay_norm_weights=False), torch.device("cpu"))
    assert decayed(nanogpt) == {n for n, p in model.named_parameters() if p.dim() >= 2}
    trainer = make_optimizer(model, TrainConfig(decay_norm_weights=True), torch.device("cpu"))
    expected = {n for n in get_parameter_names(model, [torch.nn.LayerNorm]) if "bias" not in n}
    assert decayed(trainer) == expected and any(".ln_" in n for n in expected)


def test_a_model_folder_without_tokenizer_files_is_refused_before_training(tiny_setup, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_setup["model"] / name, bare / name)
    out = _remove(dict(tiny_setup, model=bare), tmp_path / "run", check=False)
    _one_line_error(out, "no tokenizer in", "copy the model's tokenizer files")
    assert not (tmp_path / "run").exists()
