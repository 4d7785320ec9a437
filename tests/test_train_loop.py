"""σ̂ inside `train()`: the EMA against a replay of each step from its checkpoint, the control collecting
nothing, activation checkpointing and bf16 autocast changing nothing they should not."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import EOT, make_hf_gpt2, random_tokens
from lnfree.method.calibrate import apply_site_states, calibrate
from lnfree.method.schedule import Schedule
from lnfree.method.sigma import SigmaRule
from lnfree.models import load_model
from lnfree.run.checkpoint import load_checkpoint
from lnfree.run.config import TrainConfig
from lnfree.run.train import train

CTX, MICRO = 16, 2
SITE_INPUT = {"ln1": "hook_resid_pre", "ln2": "hook_resid_mid"}


class RecordingSampler:
    """Fresh random token batches (EOTs included, one sequence starting with EOT), every batch kept."""

    def __init__(self, seed: int = 0):
        self.i, self.seed, self.drawn = 0, seed, []

    def next_indices(self, n: int) -> np.ndarray:
        return np.arange(n)

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """A fresh batch of len(indices) sequences per call; kept as its micro-batches (of MICRO sequences)."""
        idx = random_tokens(batch=len(indices), seq=CTX, seed=self.seed * 1000 + self.i, eot_every=5)
        idx[0, 0] = EOT
        self.i += 1
        self.drawn.extend(idx.split(MICRO))
        return idx

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


@pytest.fixture
def model_dir(tmp_path):
    make_hf_gpt2(n_layer=2, n_head=2, n_embd=32, n_positions=CTX, noise=0.05).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=4, batch_tokens=2 * MICRO * CTX, micro_batch=MICRO, ctx=CTX, lr=3e-3, min_lr=3e-3,
                warmup_steps=0, weight_decay=0.0, checkpoint_every=1, keep_checkpoints=10, calibration_batches=1)
    return TrainConfig(**{**base, **kw})


def _schedule() -> Schedule:
    # blocks.0.ln2 freezes at step 2 with both specials until step 3; ln1 of block 0 freezes Q/K at step 1
    return Schedule(total_steps=4, freeze_at={"blocks.0.ln2": 2, "blocks.0.ln1.qk": 1},
                    eot_off={"blocks.0.ln2": 3}, bos_off={"blocks.0.ln2": 3})


def _sigmas(model) -> dict[str, tuple[float, float, float]]:
    return {n: (s.sigma.item(), s.sigma_bos.item(), s.sigma_eot.item()) for n, s in model.norm_sites().items()}


def _ema(old: tuple, measured: tuple, momentum: float) -> tuple:
    return tuple(momentum * o + (1 - momentum) * s for o, s in zip(old, measured, strict=True))


def _flat(sigmas: dict) -> list[float]:
    return [v for site in sorted(sigmas) for v in sigmas[site]]


def _site_stats(model, batches, site: str) -> tuple[float, float, float]:
    """Mean per-token std of the site's input over `batches`: main (not position 0, not EOT), position 0, EOT."""
    block, name = site.split(".")[1], site.split(".")[2]
    values = {"main": [], "bos": [], "eot": []}
    with torch.no_grad():
        for idx in batches:
            cache = {}
            model(idx, cache=cache)
            x = cache[f"blocks.{block}.{SITE_INPUT[name]}"]
            std = (x.var(-1, correction=0) + 1e-5).sqrt()
            eot = idx == EOT
            eot[:, 0] = False
            main = ~eot
            main[:, 0] = False
            values["main"].append(std[main])
            values["bos"].append(std[:, 0])
            values["eot"].append(std[eot])
    return tuple(torch.cat(values[k]).mean().item() for k in ("main", "bos", "eot"))


@pytest.mark.parametrize("ema", ["step", "call"])
def test_ema_in_the_loop_against_a_replay(model_dir, tmp_path, ema):
    """Replay every step from its checkpoint, with the weights and site states it ran with. "step": σ̂ after the
    step = m · σ̂ before + (1 − m) · the mean std over both micro-batches (one update per optimizer step, not per
    micro-batch). "call": one update per micro-batch, ln_1 moving by three reference calls (Q/K, V, V at EOT).
    Frozen sites keep the σ̂ of the step before their freeze; the specials follow their own EMA."""
    m = 0.6
    rule = SigmaRule(ema=ema, momentum=m, v_reads=2)
    model = load_model(model_dir)
    initial = copy.deepcopy(model)
    sampler = RecordingSampler()
    calibration = [random_tokens(batch=MICRO, seq=CTX, seed=99)]
    schedule = _schedule()
    train(model, sampler, _cfg(), schedule, tmp_path / "run", sigma=rule, calibration_batches=calibration,
          progress=False)
    before = copy.deepcopy(initial)
    calibrate(before, calibration)
    for step in range(4):
        after, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{step + 1:08d}")
        weights = before  # the weights and σ̂ step `step` ran with
        apply_site_states(weights, schedule.state_at(step))
        batches = sampler.drawn[2 * step: 2 * step + 2]
        old, new = _sigmas(weights), _sigmas(after)
        for site in ("blocks.0.ln2", "blocks.1.ln2", "blocks.1.ln1.qk", "blocks.0.ln1.v", "blocks.0.ln1.qk"):
            expected = old[site]
            if not weights.norm_sites()[site].is_frozen:
                if ema == "step":
                    expected = _ema(expected, _site_stats(weights, batches, site), m)
                for idx in batches if ema == "call" else ():
                    expected = _ema(expected, _site_stats(weights, [idx], site), m ** (3 if ".ln1." in site else 1))
            assert new[site] == pytest.approx(expected, rel=1e-5), (site, step)
        before = after
    # σ̂ at the freeze is the EMA through the step before, and stays
    final = _sigmas(before)
    assert final["blocks.0.ln2"] == _sigmas(load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002")[0])[
        "blocks.0.ln2"]


def test_control_collects_no_statistics(model_dir, tmp_path):
    model = load_model(model_dir)
    initial = _sigmas(model)
    train(model, RecordingSampler(), _cfg(steps=2), Schedule(total_steps=2, freeze_at={}), tmp_path / "run",
          sigma=SigmaRule(ema="call", momentum=0.5), mode="control", progress=False)
    assert _sigmas(model) == initial
    assert all(s.stat_counts.sum() == 0 for s in model.norm_sites().values())


@pytest.mark.parametrize("ema", ["step", "call"])
def test_activation_checkpointing_changes_nothing(model_dir, tmp_path, ema):
    rule = SigmaRule(ema=ema, momentum=0.5, tracking="norm", positions="pooled", v_reads=2)
    runs = {}
    for flag in (False, True):
        model = load_model(model_dir)
        torch.manual_seed(0)
        result = train(model, RecordingSampler(), _cfg(activation_checkpointing=flag, dropout=0.1),
                       _schedule(), tmp_path / f"run{flag}", sigma=rule,
                       calibration_batches=[random_tokens(batch=MICRO, seq=CTX, seed=99)], progress=False)
        lines = (tmp_path / f"run{flag}" / "metrics.jsonl").read_text().splitlines()
        runs[flag] = ([json.loads(line)["loss"] for line in lines], _flat(_sigmas(model)), result.model.state_dict())
    (l0, s0, w0), (l1, s1, w1) = runs[False], runs[True]
    assert l0 == pytest.approx(l1, abs=1e-6)  # recomputes see the σ̂ and dropout masks their forward used
    assert s0 == pytest.approx(s1, rel=1e-6)  # and are not measured a second time
    assert all(torch.allclose(w0[k], w1[k], atol=1e-6) for k in w0)


def test_bf16_autocast_runs_and_stays_close_to_fp32(model_dir, tmp_path):
    out = {}
    for dtype in ("fp32", "bf16"):
        model = load_model(model_dir)
        train(model, RecordingSampler(), _cfg(dtype=dtype, steps=3), _schedule(), tmp_path / dtype,
              sigma=SigmaRule(ema="step", momentum=0.5),
              calibration_batches=[random_tokens(batch=MICRO, seq=CTX, seed=99)], progress=False)
        out[dtype] = (model, _sigmas(model))
    assert all(p.dtype == torch.float32 for p in out["bf16"][0].parameters())  # master weights stay fp32
    assert _flat(out["bf16"][1]) == pytest.approx(_flat(out["fp32"][1]), rel=2e-2)
    idx = random_tokens(batch=2, seq=CTX, seed=5)
    with torch.no_grad():
        a, b = out["fp32"][0].eval()(idx), out["bf16"][0].eval()(idx)
    assert (a - b).abs().max().item() < 0.1 and not torch.equal(a, b)


class _DeviceReads:
    """Counts what a step reads from the device: `.item()`, `.tolist()`, a tensor in an `if` (bool/float/int), and
    boolean-mask indexing (a data-dependent shape: a host sync on a GPU and a graph break under compile)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.counts = {name: 0 for name in (*self.NAMES, "mask index")}
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))
        getitem = torch.Tensor.__getitem__

        def masked(t, key):
            keys = key if isinstance(key, tuple) else (key,)
            if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
                self.counts["mask index"] += 1
            return getitem(t, key)
        monkeypatch.setattr(torch.Tensor, "__getitem__", masked)

    def _counting(self, name, original):
        def counted(t, *args, **kwargs):
            self.counts[name] += 1
            return original(t, *args, **kwargs)
        return counted


@pytest.mark.parametrize("ema", ["step", "call"])
def test_a_training_step_reads_the_device_once(model_dir, monkeypatch, ema):
    """The hot path has no host syncs: through site switches, specials being eased out, σ̂ statistics, the EMA and
    the aux loss, a step reads the device once — its losses and grad norm, together."""
    from lnfree.run.step import Stepper

    model = load_model(model_dir)
    schedule = Schedule(total_steps=5, freeze_at={"blocks.0.ln2": 1, "blocks.0.ln1.qk": 2, "blocks.1.ln1.v": 2},
                        eot_off={"blocks.0.ln2": 4}, bos_off={"blocks.0.ln2": 4}, bos_ramp=2)
    rule = SigmaRule(ema=ema, momentum=0.5, tracking="norm")
    stepper = Stepper(model, _cfg(steps=5, aux_weight=0.1, dropout=0.1), schedule, sigma=rule)
    calibrate(model, [random_tokens(batch=MICRO, seq=CTX, seed=99)], rule)
    stepper.start()
    sampler = RecordingSampler()
    reads = _DeviceReads(monkeypatch)
    for step in range(5):
        stepper.begin(step)
        stepper.compute(step, sampler.gather(np.arange(2 * MICRO)))
        stepper.finish()
    monkeypatch.undo()
    assert reads.counts == {**{name: 0 for name in reads.counts}, "tolist": 5}
    assert sum(s.is_frozen for s in model.norm_sites().values()) == 3


def test_compiled_removal_keeps_one_graph_across_site_switches(model_dir, tmp_path):
    """`--compile` (activation checkpointing on): through freezes and specials eased out, the compiled run gives the
    eager run's losses and σ̂, with no graph break and no recompile — one graph serves every site state."""
    from torch._dynamo.utils import counters

    rule = SigmaRule(ema="call", momentum=0.5, tracking="norm", v_reads=2)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = load_model(model_dir)
        train(model, RecordingSampler(), _cfg(compile=compiled, activation_checkpointing=True, aux_weight=0.1,
                                              checkpoint_every=100), _schedule(), tmp_path / f"run{compiled}",
              sigma=rule, calibration_batches=[random_tokens(batch=MICRO, seq=CTX, seed=99)], progress=False)
        lines = (tmp_path / f"run{compiled}" / "metrics.jsonl").read_text().splitlines()
        runs[compiled] = ([json.loads(line)["loss"] for line in lines], _flat(_sigmas(model)))
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-4)


def test_distillation_adds_the_weighted_forward_kl_to_the_original(model_dir):
    """--distill-weight w: each micro-batch's loss is CE + w · KL(original ‖ model), the KL between next-token
    distributions averaged over every position, the original (teacher) with every norm live and untouched. The
    step's gradient and reported figure are checked against that formula written out by hand."""
    from lnfree.run.step import Stepper

    model = load_model(model_dir)
    teacher = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():  # a model that has drifted from the original
        for p in model.parameters():
            p.add_(0.1 * p.std() * torch.randn_like(p))
    rule = SigmaRule(ema="step", momentum=0.5, tracking="norm")
    calibrate(model, [random_tokens(batch=MICRO, seq=CTX, seed=99)], rule)
    schedule = Schedule(total_steps=2, freeze_at={"blocks.0.ln2": 0, "blocks.1.ln1.v": 0})
    weight = 0.7
    stepper = Stepper(model, _cfg(steps=2, distill_weight=weight, grad_clip=1e9), schedule, sigma=rule,
                      teacher=teacher)
    stepper.start()
    stepper.begin(0)
    batch = RecordingSampler().gather(np.arange(2 * MICRO))
    reference = copy.deepcopy(model)  # the same site states, for the loss written out by hand
    figures = stepper.compute(0, batch)

    kls = []
    for idx in batch.split(MICRO):
        logits = reference(idx)
        with torch.no_grad():
            p = torch.softmax(load_model(model_dir)(idx).double(), dim=-1)  # the original, as loaded
        kl = (p * (p.log() - torch.log_softmax(logits.double(), dim=-1))).sum(-1).mean()
        targets = idx[:, 1:].flatten()
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), targets)
        ((ce + weight * kl) / 2).backward()
        kls.append(kl.item())
    assert figures.distill == pytest.approx(sum(kls) / 2, rel=1e-4, abs=1e-7) and figures.distill > 1e-3
    for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, ref.grad.to(p.grad.dtype), rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in teacher.parameters())
    original = load_model(model_dir).state_dict()
    assert all(torch.equal(v, original[k]) for k, v in teacher.state_dict().items())  # the teacher never trains
