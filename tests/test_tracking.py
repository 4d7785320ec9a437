"""Runs people can watch: validation CE and σ̂ in metrics.jsonl (without changing the run), TensorBoard and W&B,
plain progress lines off a terminal, `lnfree plot`, and a command line that carries every training setting."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from lnfree.cli import build_parser, main
from lnfree.run.config import TrainConfig
from test_train import RUN_ARGS, _losses


def _records(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _held_out(tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text((Path(os.__file__).parent / "fnmatch.py").read_text())
    return path


def _remove(setup, out, *extra):
    return main(["remove", str(setup["model"]), "--data", str(setup["corpus"]), "--out", str(out), "--cache-dir",
                 str(setup["cache"]), *RUN_ARGS, *extra])


def test_validation_and_sigma_are_logged_without_changing_the_run(tiny_setup, tmp_path):
    """Validating in eval mode must not draw dropout masks nor move σ̂: the run with --eval-every is the run without,
    loss for loss; its val CE equals the final model's CE on the held-out tokens; σ̂ in the log is the model's."""
    from lnfree.analysis.evaluate import evaluate_ce
    from lnfree.data import SequenceSampler, build_token_cache
    from lnfree.models import load_model
    from lnfree.run.runs import run_removal
    from lnfree.tokenizer import load_tokenizer

    held_out = _held_out(tmp_path)
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    assert _remove(tiny_setup, plain, "--dropout", "0.1") == 0
    settings = {"steps": 12, "batch_tokens": 128, "micro_batch": 2, "ctx": 32, "checkpoint_every": 3,
                "warmup_steps": 2, "dropout": 0.1, "eval_every": 5, "eval_tokens": 160}
    result = run_removal(str(tiny_setup["model"]), str(tiny_setup["corpus"]), watched, overrides=settings,
                         cache_root=tiny_setup["cache"], progress=False, eval_data=str(held_out))
    assert _losses(watched) == _losses(plain)
    records = _records(watched)
    assert [r["step"] for r in records if "val_loss" in r] == [4, 9, 11]  # every 5 steps and the last
    assert all("val_loss" not in r for r in _records(plain))
    # the last val CE is the final (folded) model's CE on the same 5 sequences of 32 tokens
    cache = build_token_cache(str(held_out), load_tokenizer(tiny_setup["model"]), split="all",
                              cache_root=tiny_setup["cache"], progress=False)
    batch = SequenceSampler(cache, 32, shuffle=False).next_batch(5)
    final = evaluate_ce(load_model(watched / "final"), [batch], progress=False)
    assert records[-1]["val_loss"] == pytest.approx(final.mean, abs=1e-5)
    # σ̂ of every site at each step as the model held it; the last one is the run's final σ̂
    sites = result.model.norm_sites()
    assert records[-1]["sigma"] == {name: pytest.approx(site.sigma.item(), rel=1e-7) for name, site in sites.items()}
    assert records[0]["sigma"] != records[-1]["sigma"]  # σ̂ moved while sites were live


def test_tensorboard_holds_loss_validation_and_sigma(tiny_setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert _remove(tiny_setup, run, "--eval-every", "4", "--eval-data", str(_held_out(tmp_path)),
                   "--report-to", "tensorboard") == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    records = _records(run)
    assert {"loss", "val_loss", "lr", f"sigma/{next(iter(records[0]['sigma']))}"} <= tags
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in records])
    assert [e.step for e in events.Scalars("val_loss")] == [3, 7, 11]
    site = "ln_final"
    assert [e.value for e in events.Scalars(f"sigma/{site}")] == pytest.approx([r["sigma"][site] for r in records])


def test_wandb_offline_run_without_network(tiny_setup, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    assert _remove(tiny_setup, run, "--steps", "3", "--report-to", "wandb") == 0
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and (run / "wandb-id").read_text() in offline[0].name
    assert list(offline[0].glob("*.wandb"))  # the run's records, for `wandb sync`


def test_progress_is_plain_lines_off_a_terminal():
    from lnfree.run.tracking import StepProgress

    stream = io.StringIO()
    progress = StepProgress(0, 100, "lnfree run", stream=stream)
    for step in range(100):
        progress.update(step, {"loss": "1.0"})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 50
    assert lines[-1].startswith("lnfree run: step 100/100 loss 1.0")


def test_plot_renders_a_remove_run_with_its_control(tiny_setup, tmp_path, capsys):
    runs = tmp_path / "runs"
    held_out = str(_held_out(tmp_path))
    assert _remove(tiny_setup, runs / "lnfree", "--eval-every", "6", "--eval-data", held_out) == 0
    assert _remove(tiny_setup, runs / "vanilla", "--control", "--eval-every", "6", "--eval-data", held_out) == 0
    assert main(["plot", str(runs / "lnfree"), "--cache-dir", str(tiny_setup["cache"])]) == 0
    assert (runs / "lnfree" / "plots.png").stat().st_size > 20_000
    assert main(["plot", str(runs / "vanilla"), "--no-residual", "--out", str(tmp_path / "v.png")]) == 0
    assert (tmp_path / "v.png").stat().st_size > 20_000
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err


def test_every_training_setting_is_a_flag():
    from lnfree.commands.flags import training_overrides

    given = {"betas": (["0.8", "0.9"], (0.8, 0.9)), "dtype": (["bf16"], "bf16"), "device": (["cpu"], "cpu"),
             "decay_steps": (["7"], 7), "max_train_tokens": (["4096"], 4096), "lora_alpha": (["32"], 32.0),
             "lora_trainable": (["biases"], "biases"), "lora_targets": (["fc,proj"], "fc,proj")}
    argv = ["remove", "m", "--data", "d", "--out", "o"]
    expected = {}
    for f in fields(TrainConfig):
        if f.name == "control":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(TrainConfig(), f.name)
        if isinstance(default, bool):
            argv.append(flag if not default else f"--no-{flag[2:]}")
            expected[f.name] = not default
        elif f.name in given:
            argv += [flag, *given[f.name][0]]
            expected[f.name] = given[f.name][1]
        else:
            argv += [flag, str(default * 3)]
            expected[f.name] = default * 3
    args = build_parser().parse_args(argv)
    args.config_overrides = {}
    assert training_overrides(args) == expected


def test_help_and_version_do_not_import_torch():
    code = ("import sys\nfrom lnfree.cli import main\n"
            "for argv in (['remove', '--help'], ['pretrain', '--help'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'the command line imported torch to show help'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "[0.01]" in out.stdout.replace("\n", " ") or "[0.01]" in out.stdout  # defaults are shown
    assert "lnfree " in out.stdout and "torch " in out.stdout  # --version


def test_config_replays_a_run_and_resume_may_change_only_safe_settings(tiny_setup, tmp_path, capsys):
    first, replay = tmp_path / "first", tmp_path / "replay"
    assert _remove(tiny_setup, first, "--steps", "6", "--lr", "1e-3", "--seed", "3", "--dropout", "0.1") == 0
    # the run.json alone replays the run: same model, data, preset and every setting, so the same losses
    assert main(["remove", "--config", str(first / "run.json"), "--out", str(replay), "--cache-dir",
                 str(tiny_setup["cache"]), "--quiet"]) == 0
    assert _losses(replay) == _losses(first)
    train = lambda run: json.loads((run / "run.json").read_text())["train"]
    assert train(replay) == train(first)
    # a settings file with a typo names it
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rate": 1e-3}))
    assert _remove(tiny_setup, tmp_path / "x", "--config", str(bad)) == 2
    assert "unknown setting 'learning_rate'" in capsys.readouterr().err
    # --resume may change how often it validates and checkpoints, not what it trains
    shutil.rmtree(first / "final")  # as if killed while writing its final model: a resume has work left to do
    assert _remove(tiny_setup, first, "--steps", "6", "--lr", "1e-3", "--seed", "3", "--dropout", "0.1", "--resume",
                   "--checkpoint-every", "1", "--eval-every", "2", "--eval-data", str(_held_out(tmp_path))) == 0


def test_device_and_dtype_are_checked_in_one_line(tiny_setup, tmp_path, capsys):
    if not torch.cuda.is_available():
        assert _remove(tiny_setup, tmp_path / "a", "--device", "cuda") == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert _remove(tiny_setup, tmp_path / "b", "--device", "tpu9") == 2
    assert "is not a device" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_peak_memory_is_the_runs_own(tiny_setup, tmp_path):
    """peak_mem_gib counts from the run's start: a 2 GiB array this process held (and freed) before the run must
    not show up in it, while it still grows with what the run holds."""
    import numpy as np

    from lnfree.run.runs import run_removal

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the CPU peak is reset through Linux's /proc/self/clear_refs")
    before = np.ones(2**28)  # 2 GiB, touched
    del before
    settings = {"steps": 4, "batch_tokens": 128, "micro_batch": 2, "ctx": 32, "warmup_steps": 1}
    run_removal(str(tiny_setup["model"]), str(tiny_setup["corpus"]), tmp_path / "run", overrides=settings,
                cache_root=tiny_setup["cache"], progress=False)
    peaks = [r["peak_mem_gib"] for r in _records(tmp_path / "run")]
    rss_now = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 2**20
    assert peaks == sorted(peaks) and peaks[0] >= 0.5 * rss_now  # the run's process, at least its RSS now
    assert peaks[-1] < rss_now + 1.0  # not the 2 GiB high-water mark from before the run


def test_bf16_on_a_cpu_that_emulates_it_says_so(tiny_setup, tmp_path, monkeypatch, capsys):
    """bf16 autocast on a CPU without bf16 instructions runs ~4× slower than fp32 (seen on SmolLM2): say it once."""
    from lnfree.run import step

    monkeypatch.setattr(step, "native_bf16_cpu", lambda: False)
    monkeypatch.setattr("lnfree.run.train.native_bf16_cpu", lambda: False)
    assert _remove(tiny_setup, tmp_path / "fp32", "--dtype", "fp32") == 0
    assert "emulated" not in capsys.readouterr().err
    assert _remove(tiny_setup, tmp_path / "bf16", "--dtype", "bf16") == 0
    assert capsys.readouterr().err.count("is emulated and slower than fp32") == 1
