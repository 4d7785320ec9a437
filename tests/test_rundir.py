"""One run per folder (runs people can trust): refusals that protect finished work and other files, the lock,
checked resumes, a corrupt newest checkpoint, stale temp files — through the command line, as users meet it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from lnfree.cli import main
from test_train import RUN_ARGS, _losses, _remove_cmd


def _run(setup, out, *extra, capsys=None):
    """`lnfree remove` in this process (no interpreter start-up): (exit code, stderr)."""
    argv = ["remove", str(setup["model"]), "--data", str(setup["corpus"]), "--out", str(out), "--cache-dir",
            str(setup["cache"]), *RUN_ARGS, *extra]
    code = main(argv)
    captured = capsys.readouterr() if capsys else None
    return code, captured.err if captured else "", captured.out if captured else ""


def _refused(result, *needles):
    code, err = result[:2]
    assert code == 2, err
    line = [x for x in err.splitlines() if x.startswith("lnfree: error:")]
    assert len(line) == 1, err
    for needle in needles:
        assert needle in line[0], line[0]


def test_a_new_run_never_lands_in_a_used_folder(tiny_setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(tiny_setup, run, "--steps", "6", capsys=capsys)[0] == 0
    first = _losses(run)
    # another run into the same folder: refused, the finished run untouched
    _refused(_run(tiny_setup, run, "--steps", "4", "--seed", "1", capsys=capsys), "already holds a run", "--overwrite")
    assert _losses(run) == first and (run / "final" / "config.json").is_file()
    # --overwrite clears it first: only the new run's checkpoints remain, so a resume cannot pick up old ones
    assert _run(tiny_setup, run, "--steps", "4", "--seed", "1", "--overwrite", capsys=capsys)[0] == 0
    assert len(_losses(run)) == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    # a folder that holds something else is never touched, --overwrite or not
    other = tmp_path / "other"
    other.mkdir()
    (other / "important.txt").write_text("keep me")
    for flags in ((), ("--overwrite",)):
        _refused(_run(tiny_setup, other, *flags, capsys=capsys), "holds no lnfree run")
    assert [p.name for p in other.iterdir()] == ["important.txt"]


def test_resume_checks_a_corrupt_checkpoint_and_stale_temps(tiny_setup, tmp_path, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _run(tiny_setup, ref, capsys=capsys)[0] == 0
    assert _run(tiny_setup, run, capsys=capsys)[0] == 0
    shutil.rmtree(run / "final")  # as if killed while writing its final model: a resume has work left to do
    # --resume may not change the run
    _refused(_run(tiny_setup, run, "--resume", "--control", capsys=capsys), "is a lnfree run", "--control")
    _refused(_run(tiny_setup, run, "--resume", "--lr", "0.01", capsys=capsys), "--lr 0.01 differs")
    _refused(_run(tiny_setup, run, "--resume", "--preset", "heimersheim2024", capsys=capsys),
             "--preset heimersheim2024 differs")
    # a lock left by a dead process is taken over; a live process's lock refuses
    (run / ".lock").write_text(str(os.getppid()))
    _refused(_run(tiny_setup, run, "--resume", capsys=capsys), f"another lnfree process (pid {os.getppid()})")
    (run / ".lock").write_text("999999999")
    # the newest checkpoint is corrupt (a truncated weights file), a kill left a temp folder behind, and the
    # metrics stop at step 8, as after a kill there: the resume falls back to the checkpoint before
    weights = run / "checkpoints" / "step_00000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (run / "checkpoints" / ".tmp-killed").mkdir()
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(metrics[:9]) + "\n")
    code, err, out = _run(tiny_setup, run, "--resume", capsys=capsys)
    assert code == 0 and "warning: checkpoint" in err and "unreadable" in err
    assert "done: 3 steps" in out  # from the step-9 checkpoint to 12, and tokens/s over those steps alone
    assert _losses(run) == _losses(ref)  # still the same run, bitwise
    assert not (run / "checkpoints" / ".tmp-killed").exists() and not (run / ".lock").exists()


def test_a_second_process_on_a_running_folder_is_refused(tiny_setup, tmp_path):
    run = tmp_path / "run"
    # long enough to outlast the second process's start (60 tiny steps ended ~2 s after the first metrics line, a
    # busy machine's interpreter start took longer, and the second run found a finished folder)
    first = subprocess.Popen(_remove_cmd(tiny_setup, run, "--steps", "300"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    second = subprocess.run(_remove_cmd(tiny_setup, run, "--steps", "300", "--resume"), capture_output=True,
                            text=True)
    first.wait()
    assert first.returncode == 0, first.stderr.read()
    assert second.returncode == 2 and "another lnfree process" in second.stderr, second.stderr
    assert len(_losses(run)) == 300  # the first run's metrics alone
