"""Bad input, as a new user types it: every bad number or setting is refused in one line naming the flag (or the
--config key) and what is valid, before anything is read or written — the model, tokenizer and data named below
do not even exist, so a check that came later would fail on them instead."""

from __future__ import annotations

import json

import pytest
import torch

from lnfree.cli import main


def _refused(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lnfree: error:"), err  # one line, no traceback
    for needle in needles:
        assert needle in err, err
    return err


def _remove(tmp_path, *extra):
    return ["remove", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"),
            "--quiet", *extra]


@pytest.mark.parametrize("flag, value, valid", [
    ("--micro-batch", "0", "at least 1"), ("--ctx", "0", "at least 2"), ("--warmup", "-5", "at least 0"),
    ("--keep-checkpoints", "-1", "at least 1"), ("--eval-tokens", "0", "at least 1"),
    ("--grad-clip", "-1", "more than 0"), ("--spike-factor", "0", "more than 1"), ("--dropout", "1", "in [0, 1)"),
    ("--lr", "nan", "more than 0"), ("--ema-momentum", "1.5", "in [0, 1]"), ("--steps", "0", "at least 1"),
    ("--aux-kind", "foo", "one of baroni, relative, sites, sites-worst"),
])
def test_a_bad_number_is_refused_before_anything_is_read(tmp_path, capsys, flag, value, valid):
    _refused(capsys, _remove(tmp_path, flag, value), f"{flag} must be {valid}, got")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("settings, says", [
    ({"lr": "abc"}, "'lr' must be a number, got 'abc'"), ({"steps": "5"}, "'steps' must be an integer, got '5'"),
    ({"micro_batch": 2.5}, "'micro_batch' must be an integer"), ({"compile": "yes"}, "'compile' must be true or false"),
    ({"betas": [0.9]}, "'betas' must be two numbers"), ({"warmup_steps": -1}, "'warmup_steps' must be at least 0"),
    ({"learning_rate": 1e-3}, "unknown setting 'learning_rate'"),
])
def test_a_config_of_the_wrong_type_names_the_key(tmp_path, capsys, settings, says):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(settings))
    _refused(capsys, _remove(tmp_path, "--config", str(config)), f"--config {config}: {says}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, says", [
    (["--layers", "0"], "--layers must be at least 1, got 0"),
    (["--heads", "3"], "--heads 3 does not divide --d-model 128; give heads that divide it (e.g. --heads 2)"),
    (["--family", "llama", "--d-model", "12", "--heads", "4"], "leaves 3 dimensions per head"),
    (["--warmup", "-5"], "--warmup must be at least 0, got -5"),
])
def test_pretrain_refuses_a_model_shape_that_cannot_train(tmp_path, capsys, extra, says):
    _refused(capsys, ["pretrain", "--tokenizer", str(tmp_path / "no-tokenizer"), "--data", "stdlib", "--out",
                      str(tmp_path / "run"), *extra], says)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, extra, says", [
    ("eval", ["--tokens", "0"], "--tokens must be at least 1, got 0"),
    ("eval", ["--tokens", "-640"], "--tokens must be at least 1, got -640"),
    ("eval", ["--ctx", "0"], "--ctx must be at least 2, got 0"),
    ("eval", ["--top-k", "-1"], "--top-k must be at least 0"),
    ("compare", ["--tokens", "0", "--out", "cmp"], "--tokens must be at least 1, got 0"),
    ("compare", ["--top-neurons", "0", "--out", "cmp"], "--top-neurons must be at least 1"),
    *([] if torch.cuda.is_available() else [
        ("eval", ["--device", "cuda"], "--device cuda: no CUDA device is available here; use --device cpu"),
        ("compare", ["--device", "cuda", "--out", "cmp"], "no CUDA device is available here")]),
])
def test_eval_and_compare_refuse_bad_numbers_and_devices_first(tmp_path, capsys, command, extra, says):
    models = [str(tmp_path / "no-model")] * (2 if command == "compare" else 1)
    _refused(capsys, [command, *models, "--data", "stdlib-val", "--quiet", *extra], says)


def test_too_short_for_the_preset_is_refused_before_step_0(tiny_setup, tmp_path, capsys):
    _refused(capsys, ["remove", str(tiny_setup["model"]), "--data", str(tiny_setup["corpus"]), "--out",
                      str(tmp_path / "run"), "--preset", "heimersheim2024", "--steps", "1", "--quiet"],
             "--steps 1 is too short", "give --steps 2 or more")
    assert not (tmp_path / "run").exists()
