"""Data-parallel runs under torchrun: the process group, the wrapped model, and which rows each rank trains on.

`torchrun --nproc-per-node N -m lnfree remove …` starts N processes that all run the same command; this module
makes them one run. PyTorch's own engine does the work — DDP by default, FSDP2 (`fully_shard`, per block, then
the root) with `--fsdp` — and lnfree adds what its method needs on top:

* the data order does not depend on the world size. Every rank draws the whole step's sequences from the same
  sampler; global micro-batch g = j·W + r (row block [g·m, (g+1)·m)) is rank r's j-th micro-batch, so the
  micro-batches of a W-process run are those of a 1-process run with the same micro-batch size, and the dropout
  masks are seeded by (seed, step, g): under the per-step σ̂ rule W processes × micro-batch m are the 1-process
  run with micro-batch m, and a checkpoint resumes at any world size.
* σ̂ statistics are summed over ranks before every σ̂ update (method/sites.py: `reduce_across_ranks`). Under the
  2025 per-call rule that is one update per global micro-step, from W micro-batches at once: W processes ×
  micro-batch m are the 1-process run with micro-batch W·m (when dropout and the auxiliary loss, which depend on
  the micro-batch's size, are off) — tests/test_distributed.py holds both.
* loss, aux loss and grad norm are global, so a spike stops every rank at the same step.
* only rank 0 prints and writes run files; a rank that stops answering makes the others stop after
  `--dist-timeout` seconds with a message naming it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Run the block on each node's local rank 0 first, then on the other ranks (a cache is built once per node
        and opened by the rest); when a local rank 0 fails, the others stop instead of waiting."""
        if self.local_rank != 0 and not self.all_true(True):
            raise PeerFailed("a node's rank 0 failed preparing the data")
        try:
            yield
        except BaseException:
            if self.local_rank == 0:
                self.all_true(False)
            raise
        if self.local_rank == 0:
            self.all_true(True)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def rank_rows(self, n_rows: int, micro_batch: int) -> np.ndarray:
        """Positions (within the step's n_rows sequences) of this rank's rows: its micro-batches j = 0, 1, … are
        the global micro-batches j·W + rank."""
        return np.arange(n_rows).reshape(-1, self.size, micro_batch)[:, self.rank].reshape(-1)

    def global_micro_index(self, j: int) -> int:
        return j * self.size + self.rank


SINGLE = World()  # one process
_WORLD = SINGLE


class PeerLost(RuntimeError):
    """Another rank stopped answering (died or hung); this rank stopped too."""


class PeerFailed(RuntimeError):
    """Rank 0 failed while preparing the run; the other ranks stop quietly (rank 0 printed why)."""


def current() -> World:
    return _WORLD


def launched_world_size() -> int:
    """The process count torchrun (or a scheduler's equivalent environment) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto": cuda (this rank's card under torchrun) when available, else cpu; or any torch device string,
    checked to exist."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "cuda" and local_rank and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init(device_name: str = "auto", *, fsdp: bool = False, timeout_s: float = 600.0) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (once per process) and pick this rank's device. A plain `lnfree`
    run gets World() and `resolve_device(device_name)`."""
    global _WORLD
    size = launched_world_size()
    if size <= 1:
        _WORLD = World(fsdp=fsdp)
        return _WORLD, resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif rank == 0:
            print(f"lnfree: {size} processes on CPU: no NCCL, the ranks talk over gloo", file=sys.stderr,
                  flush=True)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    _WORLD = World(rank=rank, size=size, local_rank=local_rank, fsdp=fsdp)
    return _WORLD, device


def check_batch_layout(seqs_per_step: int, micro_batch: int, world: World) -> int:
    """Micro-batches per step on each rank; a world size that does not divide the step's micro-batches is refused
    with the sizes that would."""
    n_micro = seqs_per_step // micro_batch
    if n_micro % world.size:
        sizes = [w for w in range(1, n_micro + 1) if n_micro % w == 0]
        micro = [m for m in range(1, seqs_per_step + 1) if seqs_per_step % (m * world.size) == 0]
        fix = (f"--micro-batch {' or '.join(map(str, micro[-3:]))}" if micro else
               f"a --batch-tokens that holds a multiple of {world.size} sequences")
        raise ValueError(f"{world.size} processes cannot share a step of {n_micro} micro-batches of {micro_batch} "
                         f"sequences; use a world size in {sizes}, or at {world.size} processes {fix}")
    return n_micro // world.size


def micro_seed(seed: int, step: int, global_micro: int) -> int:
    """The RNG seed of one global micro-batch (its dropout masks): the same whatever rank runs it, and needing no
    saved generator state to resume."""
    return int(np.random.SeedSequence([seed, step, global_micro]).generate_state(1, np.uint64)[0] >> 1)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def spans_ranks() -> bool:
    """Whether this process is one of several in a process group (collectives have work to do)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (nothing in one process)."""
    if spans_ranks():
        dist.all_reduce(tensor)
    return tensor


def wrap(model: nn.Module, world: World, device: torch.device, compile: bool) -> nn.Module:
    """What the training step calls: the model itself in one process; DDP (σ̂ buffers not broadcast — they are
    reduced explicitly) or FSDP2 per block then the root (sharded in place; torchtitan's order: activation
    checkpointing inside each block's call, compile per block, then `fully_shard`)."""
    if world.fsdp and world.active:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer_blocks():
            if compile:
                block.compile()
            fully_shard(block)
        fully_shard(model)
        return model.to(device)  # shard first, then move: no rank holds the whole model on its card
    model.to(device)
    if world.active:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # σ̂ buffers are reduced explicitly; rank 0's must not overwrite the others' statistics at every forward
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        model = DistributedDataParallel(model, device_ids=ids, **no_buffer_sync)
    return torch.compile(model) if compile else model


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, world: World, last: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on every micro-step but the last of an optimizer step."""
    if not world.active or last:
        if world.fsdp and world.active:
            wrapped.set_requires_gradient_sync(True)
        yield
    elif world.fsdp:
        wrapped.set_requires_gradient_sync(False)
        yield
    else:
        inner = getattr(wrapped, "_orig_mod", wrapped)  # a compiled DDP: no_sync lives on the DDP module
        with inner.no_sync():
            yield


def is_comm_error(error: BaseException) -> bool:
    """Whether an exception came from a collective that another rank never joined (gloo / NCCL timeouts and closed
    connections)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                                   "gloo", "nccl"))


def peer_lost(world: World, error: BaseException, step: int, timeout_s: float, last_ckpt) -> PeerLost:
    """Turn a failed collective into one line naming the rank(s) that stopped answering, what was kept, and what to
    do. The ranks still alive each leave a mark in the rendezvous store (torchrun's agent holds it); the ranks
    without one after a short wait are the dead or hung ones."""
    wait_s = min(timeout_s, 30)
    silent = _silent_ranks(world, f"lnfree/alive/{step}", wait_s)
    what = (f"rank {', '.join(map(str, silent))} stopped answering at step {step} (no sign of life within "
            f"{wait_s:g} s)" if silent else
            f"lost contact with another rank at step {step} ({str(error).splitlines()[0][-120:]})")
    kept = f"the last checkpoint {last_ckpt} is intact" if last_ckpt else "no checkpoint was written yet"
    logs = f"rank {silent[0]}'s log" if silent else "the other ranks' logs"
    return PeerLost(f"rank {world.rank}: {what}; stopped; {kept} — see {logs}, then `--resume` (at any world size)")


def _silent_ranks(world: World, key: str, wait_s: float) -> list[int]:
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{key}/{world.rank}", "1")
        deadline = time.time() + wait_s
        while True:
            silent = [r for r in range(world.size) if not store.check([f"{key}/{r}"])]
            if not silent or time.time() > deadline:
                return silent
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store went with a dead rank 0: say what is known
        return []
