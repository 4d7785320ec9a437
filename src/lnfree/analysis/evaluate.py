"""Cross-entropy evaluation with the papers' protocol: per-token losses and KL, their statistics, one model over
token batches. Datasets by name and their batches are `eval_data.py`'s; many models on many datasets (what `lnfree
eval` runs) is `eval_suite.py`'s.

Protocol (Baroni et al. 2025, as in Heimersheim 2024): documents + EOT concatenated into one stream (the
token cache of `lnfree.data`), cut into non-overlapping `ctx`-token sequences (ctx = 1024, or the model's
context if shorter), no BOS prepended, the loss of every next-token prediction inside each sequence
(ctx − 1 per sequence, EOT targets included), fp32, every sequence scored whatever the batch size. The mean is
the headline number; the distribution (median, p95, p99.9, max) and the worst sequences are kept beside it
because an LN-free model can post a huge mean from a handful of sequences (XL on the Pile: mean 130, median
1.09, from 3 sequences).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

QUANTILES = {"median": 0.5, "p95": 0.95, "p999": 0.999}


# ---- per-token losses and statistics ---------------------------------------------------------------------
@dataclass
class CEStats:
    """Per-token cross-entropy of one model on one dataset (nats)."""

    mean: float
    median: float
    p95: float
    p999: float
    max: float
    n_tokens: int
    n_sequences: int
    top_sequences: list[tuple[int, float]]  # (sequence index in eval order, its mean loss), worst first
    kl: float | None = None  # mean KL(reference ‖ model) per prediction, when a reference was given
    seconds: float = 0.0
    token_losses: np.ndarray | None = field(default=None, repr=False)  # (n_sequences, ctx − 1) if kept

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: token losses are left out; top sequences become {"index", "loss"} records."""
        d = asdict(self)
        d.pop("token_losses")
        d["top_sequences"] = [{"index": i, "loss": loss} for i, loss in self.top_sequences]
        return d


def summarize_losses(token_losses: np.ndarray, top_k: int = 5) -> CEStats:
    """Statistics of a (n_sequences, predictions per sequence) array of per-token losses.

    Quantiles are exact, over all tokens (numpy, linear interpolation); torch.quantile refuses > 16M values.
    """
    losses = np.asarray(token_losses, dtype=np.float32)
    if losses.ndim != 2 or losses.size == 0:
        raise ValueError(f"expected a non-empty (sequences, tokens) array of losses, got shape {losses.shape}")
    flat = losses.reshape(-1)
    q = np.quantile(flat, list(QUANTILES.values()))
    seq_means = losses.mean(axis=1, dtype=np.float64)
    k = min(top_k, len(seq_means))
    worst = np.argsort(-seq_means, kind="stable")[:k]
    return CEStats(mean=float(flat.mean(dtype=np.float64)), median=float(q[0]), p95=float(q[1]), p999=float(q[2]),
                   max=float(flat.max()), n_tokens=int(flat.size), n_sequences=int(losses.shape[0]),
                   top_sequences=[(int(i), float(seq_means[i])) for i in worst])


def token_cross_entropy(logits: Tensor, idx: Tensor) -> Tensor:
    """(B, T, V) logits, (B, T) ids → (B, T − 1) fp32 losses of every next-token prediction.

    The last position has no target; it gets ignore_index so the logits are used as one contiguous view
    (slicing them off first would copy the largest tensor of the step).
    """
    B, T, V = logits.shape
    targets = F.pad(idx[:, 1:], (0, 1), value=-100)  # (B, T)
    losses = F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(-1), reduction="none")
    return losses.view(B, T)[:, :-1]


def token_kl(ref_logits: Tensor, logits: Tensor, rows_per_chunk: int = 1) -> Tensor:
    """KL(reference ‖ model) per prediction, (B, T − 1), in fp32, a few sequences at a time (memory: V-wide)."""
    out = []
    for r, m in zip(ref_logits[:, :-1].split(rows_per_chunk), logits[:, :-1].split(rows_per_chunk), strict=True):
        log_p, log_q = F.log_softmax(r.float(), -1), F.log_softmax(m.float(), -1)
        out.append(F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1))
    return torch.cat(out)


def _forward(model: nn.Module, idx: Tensor, dtype: str) -> Tensor:
    with torch.autocast(device_type=idx.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        return model(idx)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_context(model: nn.Module) -> int:
    """Context length of one of our models, or of a transformers model (n_positions / max_position_embeddings)."""
    if hasattr(model, "norm_sites"):  # an LNModel says it itself
        return model.context_length
    cfg = model.config
    n = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if n is None:
        raise ValueError(f"cannot tell the context length of {type(model).__name__} (no n_positions in config)")
    return int(n)


def _check_batch(model: nn.Module, idx: Tensor) -> None:
    vocab = model.config.vocab_size
    if idx.ndim != 2 or idx.shape[1] < 2:
        raise ValueError(f"token batches must be (batch, ctx ≥ 2) ids, got shape {tuple(idx.shape)}")
    if int(idx.max()) >= vocab or int(idx.min()) < 0:
        raise ValueError(f"token id {int(idx.max())} is outside the model's vocabulary of {vocab}; "
                         "the data was made with another tokenizer")


@torch.no_grad()
def evaluate_ce(model: nn.Module, batches: Iterable[Tensor], *, dtype: str = "fp32",
                reference: nn.Module | None = None, top_k: int = 5, total: int | None = None,
                desc: str = "eval", progress: bool = True, keep_token_losses: bool = False) -> CEStats:
    """Per-token CE of `model` over (B, ctx) id batches, batched on the model's device.

    Losses stay on the device until the end (one transfer, no per-batch sync) except for a progress readout
    every 16 batches. With `reference` (on the same device), also the mean KL(reference ‖ model) per prediction.
    """
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    device = model_device(model)
    if reference is not None and model_device(reference) != device:
        raise ValueError(f"reference is on {model_device(reference)} but the model is on {device}")
    was_training = model.training
    model.eval()
    losses: list[Tensor] = []
    inputs: list[Tensor] = []  # kept (token ids only) to trace a non-finite loss to its norm site afterwards
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # for the progress readout only
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    start = time.perf_counter()
    bar = tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False)
    try:
        for i, idx in enumerate(bar):
            _check_batch(model, idx)
            idx = idx.to(device, non_blocking=True)
            logits = _forward(model, idx, dtype)
            losses.append(token_cross_entropy(logits, idx))
            inputs.append(idx)
            loss_sum += losses[-1].sum(dtype=torch.float64)
            if reference is not None:
                kl_sum += token_kl(_forward(reference, idx, dtype), logits).sum(dtype=torch.float64)
            del logits
            if progress and i % 16 == 0:
                seen = sum(x.numel() for x in losses)
                bar.set_postfix(ce=f"{loss_sum.item() / seen:.4f}", refresh=False)
    finally:
        model.train(was_training)
        bar.close()
    if not losses:
        raise ValueError("no complete batch to evaluate: the data holds fewer than batch_size sequences of ctx")
    token_losses = torch.cat(losses).cpu().numpy()
    stats = summarize_losses(token_losses, top_k)
    stats.seconds = time.perf_counter() - start
    stats.kl = float(kl_sum) / stats.n_tokens if reference is not None else None
    if keep_token_losses:
        stats.token_losses = token_losses
    if not math.isfinite(stats.mean):
        cause = _nonfinite_cause(model, losses, inputs, dtype)
        warnings.warn(f"{desc}: mean CE is not finite (max per-token loss {stats.max}){cause}", stacklevel=2)
    return stats


def _nonfinite_cause(model: nn.Module, losses: list[Tensor], inputs: list[Tensor], dtype: str) -> str:
    """'; <the first norm site that overflowed>' on the first batch with a non-finite loss, for a norm model."""
    from ..models.base import LNModel

    if not isinstance(model, LNModel):
        return ""
    from ..method.diagnose import first_nonfinite_site

    bad = next(i for i, x in enumerate(losses) if not torch.isfinite(x).all())
    autocast = torch.autocast(inputs[bad].device.type, dtype=torch.bfloat16) if dtype == "bf16" else None
    cause = first_nonfinite_site(model, inputs[bad], autocast)
    return f"; {cause}" if cause else ""
