"""Faults a real user meets (issue 21's probe): commands that must never delete or replace what they did not write,
damaged files that must be named (file and line), and finished work that must stay finished — each case failed
before its fix."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from lnfree.cli import main
from test_rundir import _refused, _run
from test_train import _losses


@pytest.fixture(scope="module")
def finished(tiny_setup, tmp_path_factory):
    """One finished 12-step removal run (read-only for the tests below: they copy it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert _run(tiny_setup, run)[0] == 0
    return run


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _tree(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_overwrite_never_clears_a_run_that_is_still_going(tiny_setup, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    (run / ".lock").write_text(str(os.getppid()))  # a live lnfree process holds this folder
    before = _tree(run)
    _refused(_run(tiny_setup, run, "--overwrite", capsys=capsys), "another lnfree process", "is writing to")
    _refused(_run(tiny_setup, run, capsys=capsys), "another lnfree process")  # not "use --overwrite"
    assert _tree(run) == before


def test_a_lock_left_by_a_kill_before_anything_was_written_is_an_empty_folder(tiny_setup, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("999999999")  # a kill while tokenizing: the lock was all the run had written
    assert _run(tiny_setup, run, capsys=capsys)[0] == 0
    assert (run / "final" / "config.json").is_file() and not (run / ".lock").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / ".lock").write_text("my notes")  # a user's own file of that name is not ours to remove
    _refused(_run(tiny_setup, tmp_path / "mine", capsys=capsys), "is not an lnfree lock")
    assert (tmp_path / "mine" / ".lock").read_text() == "my notes"


def test_resuming_a_finished_run_is_refused_and_touches_nothing(tiny_setup, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    before = _tree(run)
    _refused(_run(tiny_setup, run, "--resume", capsys=capsys), "is finished", "final")
    assert _tree(run) == before


def test_a_metrics_line_torn_by_a_kill_does_not_block_the_resume(tiny_setup, finished, tmp_path, capsys):
    import shutil

    run = _copy(finished, tmp_path / "run")
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_00000012")  # killed during step 11's metrics write
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:11]) + "\n" + lines[11][:25])
    assert _run(tiny_setup, run, "--resume", capsys=capsys)[0] == 0
    assert _losses(run) == _losses(finished)  # the same run, bitwise


def test_damaged_json_is_named_with_its_line_and_a_damaged_sibling_is_not_fatal(tiny_setup, finished, tmp_path,
                                                                                capsys):
    run = _copy(finished, tmp_path / "run")
    text = (run / "run.json").read_text().splitlines()
    (run / "run.json").write_text("\n".join(text[:3] + ["  oops"] + text[3:]))
    _refused(_run(tiny_setup, run, "--resume", "--overwrite", capsys=capsys), "contradict")
    import shutil

    shutil.rmtree(run / "final")
    _refused(_run(tiny_setup, run, "--resume", capsys=capsys), f"{run / 'run.json'}: damaged JSON at line 4")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2] + ['{"step": 2, "lo'] + lines[2:]) + "\n")
    # a new run beside it trains and plots, leaving the damaged sibling out of its figures
    assert _run(tiny_setup, tmp_path / "new", capsys=capsys)[0] == 0
    assert (tmp_path / "new" / "loss.png").is_file()
    assert main(["plot", str(run), "--no-residual"]) == 2
    assert f"{run / 'metrics.jsonl'}: damaged JSON at line 3" in capsys.readouterr().err


def test_non_finite_weights_are_refused_before_the_run_writes_anything(tiny_setup, tmp_path, capsys):
    broken = _copy(tiny_setup["model"], tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    name = sorted(weights)[3]
    weights[name][0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    argv_model = {**tiny_setup, "model": broken}
    _refused(_run(argv_model, tmp_path / "run", capsys=capsys), "non-finite weights", "restore the model")
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_run_behind(tiny_setup, tmp_path, capsys, monkeypatch):
    import lnfree.run.step as step_module

    def fail(*args, **kwargs):
        raise ValueError("planted failure at step 0")

    monkeypatch.setattr(step_module.Stepper, "compute", fail)
    _refused(_run(tiny_setup, tmp_path / "run", capsys=capsys), "planted failure")
    assert not (tmp_path / "run").exists()  # run.json went with it: the same command works again


def test_export_never_replaces_what_it_did_not_write_and_is_readable_by_others(finished, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        model = tmp_path / "someone-elses-model"
        _copy(finished / "final", model)
        for flags in ((), ("--overwrite",)):
            assert main(["export", str(finished), "--out", str(model), *flags]) == 2
            assert "lnfree export did not write" in capsys.readouterr().err
        assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in (finished / "final").iterdir())
        out = tmp_path / "export"
        assert main(["export", str(finished), "--out", str(out)]) == 0
        assert main(["export", str(finished), "--out", str(out)]) == 2
        assert "--overwrite to replace it" in capsys.readouterr().err
        assert main(["export", str(finished), "--out", str(out), "--format", "hf-compat", "--overwrite"]) == 0
        for folder in (out, finished / "final"):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o755
            assert stat.S_IMODE((folder / "model.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_demo_never_overwrites_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my report")
    for flags in ((), ("--fresh",)):
        assert main(["demo", "--out", str(out), "--quick", *flags]) == 2
        assert "did not write" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["report.md"] and (out / "report.md").read_text() == "my report"


def test_compare_with_its_models_swapped_says_so(tiny_setup, finished, capsys):
    assert main(["compare", str(finished / "final"), str(tiny_setup["model"]), "--data", "stdlib-val", "--out",
                 str(finished.parent / "cmp"), "--quiet"]) == 2
    assert "swap the two models" in capsys.readouterr().err


def test_data_that_is_not_text_says_why_and_leaves_no_cache_folder(tiny_setup, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_bytes(bytes(range(256)) * 40)
    cache = tmp_path / "cache"
    _refused(_run({**tiny_setup, "corpus": data, "cache": cache}, tmp_path / "run", capsys=capsys), "UTF-8")
    assert not [p for p in cache.rglob("*") if p.is_dir() and [c.name for c in p.iterdir()] == [".lock"]]


class Planted:
    """An object a pickle may carry and `weights_only` refuses to build."""


def test_a_pickled_weights_file_is_one_line(tiny_setup, tmp_path, capsys):
    folder = _copy(tiny_setup["model"], tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    torch.save({"weights": torch.zeros(2), "code": Planted()}, folder / "pytorch_model.bin")
    assert main(["eval", str(folder), "--data", "stdlib-val", "--tokens", "64", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds more than tensors" in err, err


def test_a_resume_on_changed_data_says_the_data_changed(tiny_setup, tmp_path, capsys):
    import shutil

    corpus = _copy(tiny_setup["corpus"], tmp_path / "corpus")
    setup = {**tiny_setup, "corpus": corpus, "cache": tmp_path / "cache"}
    run = tmp_path / "run"
    assert _run(setup, run, capsys=capsys)[0] == 0
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_00000012")
    (corpus / "new.txt").write_text((corpus / "doc0.txt").read_text().upper())  # a document added since
    _refused(_run(setup, run, "--resume", capsys=capsys), "the data or the tokenizer changed")


def test_a_full_disk_while_saving_says_so(tiny_setup, tmp_path, capsys, monkeypatch):
    import errno

    import lnfree.run.checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lnfree.run.checkpoint, "save_file", full)
    _refused(_run(tiny_setup, tmp_path / "run", capsys=capsys), "no space left on the device", "--resume")


def test_a_run_record_missing_its_schedule_is_named_and_nothing_is_touched(tiny_setup, finished, tmp_path, capsys):
    import json
    import shutil

    run = _copy(finished, tmp_path / "run")
    shutil.rmtree(run / "final")
    record = json.loads((run / "run.json").read_text())
    del record["schedule"]  # valid JSON, but not the record a resume needs
    (run / "run.json").write_text(json.dumps(record))
    before = _tree(run)
    _refused(_run(tiny_setup, run, "--resume", capsys=capsys), f"{run / 'run.json'}: not an lnfree run record",
             "schedule")
    assert _tree(run) == before


def test_a_run_that_died_before_its_first_checkpoint_is_told_the_way_out(tiny_setup, finished, tmp_path, capsys):
    import shutil

    run = _copy(finished, tmp_path / "run")
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints")  # e.g. the disk filled up while the first checkpoint was written
    _refused(_run(tiny_setup, run, "--resume", capsys=capsys), "no checkpoint", "--overwrite")
    _refused(_run(tiny_setup, run, capsys=capsys), "already holds a run")  # dropping --resume is no way out
    assert _run(tiny_setup, run, "--overwrite", capsys=capsys)[0] == 0  # the one the message names is


def test_eval_names_a_damaged_model_config_not_the_tokenizer(finished, tmp_path, capsys):
    model = _copy(finished / "final", tmp_path / "model")
    text = (model / "config.json").read_text().splitlines()
    (model / "config.json").write_text("\n".join(text[:2] + ["  oops"] + text[2:]))
    assert main(["eval", str(model), "--data", "stdlib-val", "--tokens", "64", "--ctx", "32", "--quiet"]) == 2
    assert f"{model / 'config.json'}: damaged JSON at line 3" in capsys.readouterr().err
