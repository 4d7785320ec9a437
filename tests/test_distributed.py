"""Runs under torchrun on CPU (gloo): two processes make the same run as one — DDP and FSDP2 —, checkpoints resume
at another world size, and a rank that dies or hangs is named while the last checkpoint stays intact."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import rewind_copy
from test_train import _LIVE_PRESET, CTX, RUN_ARGS

TOL = 1e-5
# 8 sequences per step in micro-batches of 2: four global micro-batches, two per rank at world size 2 (so the
# interleaving of ranks' rows matters), and a world size of 3 does not divide the step.
ARGS = [*RUN_ARGS, "--batch-tokens", str(8 * CTX), "--keep-checkpoints", "4"]


@pytest.fixture(scope="module")
def live(tiny_setup):
    """The test preset as a script torchrun can start (it registers "live", then runs the CLI)."""
    script = tiny_setup["root"] / "live_preset.py"
    script.write_text(_LIVE_PRESET)
    return {**tiny_setup, "script": script}


def _args(setup, out, *extra):
    return ["remove", str(setup["model"]), "--data", str(setup["corpus"]), "--out", str(out), "--cache-dir",
            str(setup["cache"]), "--preset", "live", *ARGS, *extra]


def _env(ema: str, **more) -> dict:
    return {**os.environ, "LNFREE_TEST_EMA": ema, "OMP_NUM_THREADS": "1", **more}


def _run1(setup, out, *extra, ema="step"):
    """One process, as `lnfree remove` runs without torchrun."""
    return subprocess.run([sys.executable, str(setup["script"]), *_args(setup, out, *extra)], env=_env(ema),
                          capture_output=True, text=True, timeout=300)


def _torchrun(setup, out, nproc, *extra, ema="step"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(setup["script"]), *_args(setup, out, *extra)]
    return subprocess.run(cmd, env=_env(ema), capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(setup, out, nproc, *extra, ema="step", logs: Path):
    """The ranks as separate processes with torchrun's environment, so that a test can stop or kill one."""
    port, procs = _free_port(), []
    for rank in range(nproc):
        env = _env(ema, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        with open(logs / f"rank{rank}.out", "w") as so, open(logs / f"rank{rank}.err", "w") as se:
            procs.append(subprocess.Popen([sys.executable, str(setup["script"]), *_args(setup, out, *extra)],
                                          env=env, stdout=so, stderr=se))
    return procs


def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(run: Path, ref: Path) -> None:
    """Per-step loss, aux loss, grad norm and σ̂ at every site, the removal events, and the final weights."""
    a, b = _records(run), _records(ref)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(12))
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert abs(x[key] - y[key]) <= TOL, (x["step"], key, x[key], y[key])
        assert x["sigma"].keys() == y["sigma"].keys()
        for site in x["sigma"]:
            assert abs(x["sigma"][site] - y["sigma"][site]) <= TOL, (x["step"], site)
        assert x.get("events") == y.get("events")
    wa, wb = load_file(run / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= TOL


@pytest.fixture(scope="module")
def reference(live, tmp_path_factory):
    """The one-process run every distributed run must equal (σ̂ EMA per step, specials, dropout, aux loss)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _ok(_run1(live, out))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_make_the_one_process_run(live, reference, tmp_path, mode):
    out = tmp_path / mode
    # FSDP2 composed with activation checkpointing (each block recomputed, its parameters gathered again)
    result = _ok(_torchrun(live, out, 2, *(["--fsdp", "--activation-checkpointing"] if mode == "fsdp" else [])))
    _assert_same_run(out, reference)
    assert result.stderr.count("the ranks talk over gloo") == 1  # said once, by rank 0
    assert result.stdout.count("done:") == 1 and result.stdout.count("# preset live") == 1  # rank 0 prints
    ckpt = out / "checkpoints" / "step_00000012"
    assert (ckpt / "dcp").is_dir() if mode == "fsdp" else (ckpt / "model.safetensors").is_file()
    assert json.loads((out / "final" / "config.json").read_text())["architectures"] == ["LNFreeGPT2LMHeadModel"]


def test_per_call_sigma_moves_once_per_global_micro_step(live, tmp_path):
    """The 2025 code's rule moves σ̂ at every LN call; across ranks one update per global micro-step, from the
    statistics of every rank's micro-batch: 2 processes × micro-batch 1 = 1 process × micro-batch 2 (calibrated on
    the same 8 sequences)."""
    plain = ["--dropout", "0", "--aux-weight", "0"]  # per micro-batch: masks and σ̄ depend on its size
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(_run1(live, one, *plain, ema="call"))
    _ok(_torchrun(live, two, 2, *plain, "--micro-batch", "1", "--calibration-batches", "8", ema="call"))
    _assert_same_run(two, one)


@pytest.mark.parametrize("mode, sig", [("ddp", signal.SIGSTOP), ("fsdp", signal.SIGKILL)])
def test_a_rank_that_hangs_or_dies_is_named_and_the_run_resumes_under_one_process(live, reference, tmp_path,
                                                                                   mode, sig):
    out, logs = tmp_path / "run", tmp_path
    extra = ["--dist-timeout", "5", *(["--fsdp"] if mode == "fsdp" else [])]
    procs = _spawn(live, out, 2, *extra, logs=logs)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and procs[0].poll() is None:
            if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 7:
                break
            time.sleep(0.01)
        procs[1].send_signal(sig)
        stopped = time.time()
        rc = procs[0].wait(timeout=120)
        waited = time.time() - stopped
    finally:
        for p in procs:
            p.kill()
            p.wait()
    err = (logs / "rank0.err").read_text()
    assert rc == 2, err[-3000:]
    assert len(_records(out)) < 12, "the run finished before a rank could be stopped"
    lines = [line for line in err.splitlines() if line.startswith("lnfree: error:")]
    assert len(lines) == 1 and "rank 1 stopped answering" in lines[0] and "is intact" in lines[0], err[-2000:]
    assert waited < 5 + 30 + 20  # the timeout, the wait for signs of life, slack for a loaded machine
    # the last checkpoint is whole: one process resumes it onto the reference curve
    _ok(_run1(live, out, "--resume"))
    _assert_same_run(out, reference)


def test_a_one_process_checkpoint_resumes_under_two_processes(live, reference, tmp_path):
    out = rewind_copy(reference, tmp_path / "run")
    _ok(_torchrun(live, out, 2, "--resume", "--fsdp"))  # a whole-model checkpoint sharded on load
    _assert_same_run(out, reference)


def test_a_world_size_that_does_not_divide_the_step_is_one_line(live, tmp_path):
    procs = _spawn(live, tmp_path / "run", 3, logs=tmp_path)
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [2, 2, 2]
    err = (tmp_path / "rank0.err").read_text()
    lines = [line for line in err.splitlines() if line.startswith("lnfree: error:")]
    assert len(lines) == 1 and "3 processes cannot share a step of 4 micro-batches" in lines[0], err
    assert "[1, 2, 4]" in lines[0]
    for rank in (1, 2):  # the other ranks met the same input: rank 0 speaks for them
        assert "error" not in (tmp_path / f"rank{rank}.err").read_text()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_rank_rows_interleave_micro_batches():
    from lnfree.distributed import World

    rows = [World(rank=r, size=2).rank_rows(8, 2).tolist() for r in range(2)]
    assert rows == [[0, 1, 4, 5], [2, 3, 6, 7]]  # global micro-batches 0, 2 | 1, 3
    assert torch.equal(torch.tensor(sorted(rows[0] + rows[1])), torch.arange(8))


@pytest.mark.parametrize("wrapper", [["--fsdp"], []], ids=["fsdp2", "ddp"])
def test_a_lora_run_under_torchrun_makes_the_one_process_lora_run(live, tmp_path, wrapper):
    """`--lora` under FSDP2 (sharded checkpoints without the frozen base weights, adapters merged from the gathered
    state dict) and under DDP: the same run as one process."""
    pytest.importorskip("peft")
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(_run1(live, one, "--lora", "2"))
    _ok(_torchrun(live, two, 2, "--lora", "2", *wrapper))
    _assert_same_run(two, one)
