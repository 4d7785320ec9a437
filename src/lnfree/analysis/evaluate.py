"""Cross-entropy evaluation with the papers' protocol, loss statistics, and comparison tables.

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
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

DEFAULT_CTX = 1024
QUANTILES = {"median": 0.5, "p95": 0.95, "p999": 0.999}


@dataclass(frozen=True)
class EvalDataset:
    """What a dataset name on the command line means in terms of `lnfree.data` sources."""

    source: str
    split: str
    max_documents: int | None = None
    description: str = ""


EVAL_DATASETS: dict[str, EvalDataset] = {
    "owt-val": EvalDataset("openwebtext", "val", None,
                           "openwebtext train_test_split(test_size=0.0005, seed=2357) test part"),
    "pile": EvalDataset("apollo-research/monology-pile-uncopyrighted-tokenizer-gpt2", "train", 10_000,
                        "pre-tokenized Pile (GPT-2 ids), first 10k rows re-chunked"),
    "pile-filtered": EvalDataset("pile-filtered", "val", None, "lucabaroni/apollo-pile-filtered-10k"),
    "stdlib-val": EvalDataset("stdlib", "val", None, "the Python standard library's val files (offline)"),
}


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


# ---- datasets and models by name --------------------------------------------------------------------------
def load_eval_data(name: str, tokenizer: Any, *, cache_root: str | os.PathLike | None = None,
                   progress: bool = True):
    """A known dataset name, a token-cache folder, or a local file/folder (all of it is evaluation data)."""
    from ..data import MANIFEST_FILE, TokenCache, build_token_cache

    if name in EVAL_DATASETS:
        spec = EVAL_DATASETS[name]
        return build_token_cache(spec.source, tokenizer, split=spec.split, max_documents=spec.max_documents,
                                 cache_root=cache_root, progress=progress)
    check_dataset_name(name)
    path = Path(name).expanduser()
    if (path / MANIFEST_FILE).is_file():
        return TokenCache.open(path, tokenizer)
    return build_token_cache(str(path), tokenizer, split="all", cache_root=cache_root, progress=progress)


def check_dataset_name(name: str) -> None:
    if name not in EVAL_DATASETS and not Path(name).expanduser().exists():
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(EVAL_DATASETS)}, "
                         "or a local file/folder/token cache")


def check_compatible(name: str, model: nn.Module, data_name: str, cache: Any, ctx: int) -> None:
    """Refuse, before any compute, a model that cannot read this data or this context."""
    vocab, n_pos = model.config.vocab_size, model_context(model)
    if ctx > n_pos:
        raise ValueError(f"--ctx {ctx} exceeds model {name}'s n_positions {n_pos}")
    data_vocab = int(cache.manifest.get("vocab_size", 0))
    if data_vocab > vocab:
        raise ValueError(f"model {name} has a {vocab}-token vocabulary but {data_vocab}-token tokenizer made "
                         f"dataset {data_name}; use the model's own tokenizer")
    top = int(cache.tokens.max())
    if top >= vocab:
        raise ValueError(f"dataset {data_name} holds token id {top}, outside model {name}'s vocabulary of {vocab}")


def default_ctx(models: dict[str, nn.Module], ctx: int | None) -> int:
    return ctx if ctx is not None else min([DEFAULT_CTX, *(model_context(m) for m in models.values())])


def check_eval_numbers(batch_size: int, max_tokens: int | None, ctx: int | None, device: str | None) -> str:
    """`eval` and `compare`: --batch-size, --tokens, --ctx and --device, checked before any model or data is read;
    returns the device to use."""
    from ..distributed import resolve_device
    from ..run.config import AT_LEAST_1, Range, check_value

    check_value("--batch-size", batch_size, AT_LEAST_1)
    if max_tokens is not None:
        check_value("--tokens", max_tokens, AT_LEAST_1)
    if ctx is not None:
        check_value("--ctx", ctx, Range(2))  # one prediction per sequence
    return str(resolve_device(device or "auto"))


def _eval_batches(cache: Any, ctx: int, batch_size: int, max_tokens: int | None) -> tuple[Iterator[Tensor], int, int]:
    """(batches, number of batches, batch size) over the first `max_tokens` tokens (all when None).

    A dataset with fewer sequences than one batch is evaluated as one smaller batch rather than not at all.
    """
    from ..data import SequenceSampler

    if max_tokens is not None and max_tokens < ctx:
        raise ValueError(f"--tokens {max_tokens} is less than one sequence of {ctx} tokens (--ctx); give at least "
                         f"{ctx}")
    n_seq = cache.n_sequences(ctx)
    if max_tokens is not None:
        n_seq = min(n_seq, max_tokens // ctx)
    if n_seq == 0:
        raise ValueError(f"{cache.path}: fewer than {ctx} tokens to evaluate (one sequence of --ctx)")
    batch_size = min(batch_size, n_seq)
    n_batches = -(-n_seq // batch_size)  # the last batch may be smaller: every sequence counts
    sampler = SequenceSampler(cache, ctx, shuffle=False)
    batches = islice(sampler.iter_batches(batch_size), n_batches)
    if max_tokens is not None and n_seq % batch_size:  # trim the last batch to the token budget
        batches = (b[: n_seq - i * batch_size] for i, b in enumerate(batches))
    return batches, n_batches, batch_size


# ---- comparisons and tables --------------------------------------------------------------------------------
def compare(models: dict[str, nn.Module], datasets: dict[str, Any], *, ctx: int | None = None,
            batch_size: int = 8, max_tokens: int | None = None, dtype: str = "fp32",
            reference: nn.Module | None = None, top_k: int = 5, device: str | torch.device | None = None,
            progress: bool = True) -> dict[str, Any]:
    """CE of every model on every dataset (token caches), same sequences for all → a results dict.

    Each model visits `device` only while it is evaluated, so several large models can be compared on one GPU.
    """
    if not models or not datasets:
        raise ValueError("compare needs at least one model and one dataset")
    ctx = default_ctx(models, ctx)
    for dname, cache in datasets.items():
        for mname, model in models.items():
            check_compatible(mname, model, dname, cache, ctx)
        if reference is not None:
            check_compatible("reference", reference, dname, cache, ctx)
    device = torch.device(device) if device is not None else model_device(next(iter(models.values())))
    results: dict[str, Any] = {
        "protocol": {"ctx": ctx, "dtype": dtype, "batch_size": batch_size, "bos_prepended": False,
                     "eot_targets": True, "last_incomplete_batch": "scored", "max_tokens": max_tokens},
        "models": {n: _model_info(m) for n, m in models.items()},
        "datasets": {}, "ce": {}, "benchmarks": {}}
    if reference is not None:
        reference_home = model_device(reference)
        reference.to(device)
    for dname, cache in datasets.items():
        info = {k: cache.manifest.get(k) for k in ("source", "split", "token_count", "tokenizer_fingerprint")}
        results["datasets"][dname] = info
        results["ce"][dname] = {}
        for mname, model in models.items():
            batches, n_batches, bs = _eval_batches(cache, ctx, batch_size, max_tokens)
            info["batch_size"] = bs
            home = model_device(model)
            model.to(device)
            stats = evaluate_ce(model, batches, dtype=dtype, reference=reference, top_k=top_k, total=n_batches,
                                desc=f"{mname} on {dname}", progress=progress)
            model.to(home)
            results["ce"][dname][mname] = stats.to_dict()
    if reference is not None:
        reference.to(reference_home)
    return results


def _model_info(model: nn.Module) -> dict[str, Any]:
    return {"source": getattr(model, "source", None), "vocab_size": model.config.vocab_size,
            "n_positions": model_context(model),
            # 0: the model no longer normalises per token (frozen σ̂ without specials, or folded away)
            "live_norm_sites": len(model.normalising_sites()) if hasattr(model, "normalising_sites") else None,
            "parameters": sum(p.numel() for p in model.parameters())}


def model_labels(sources: list[str], names: list[str] | None = None) -> list[str]:
    """Column names: given ones, else the folder name (a run's, for run/final) or the hub id's last part."""
    if names:
        if len(names) != len(sources):
            raise ValueError(f"--names gives {len(names)} name(s) for {len(sources)} model(s)")
        labels = list(names)
    else:
        labels = []
        for s in sources:
            p = Path(s).expanduser()
            p = p.resolve() if p.exists() else p
            labels.append(p.parent.name if p.name == "final" else p.name or str(s))
    seen: dict[str, int] = {}
    unique = []
    for label in labels:  # the same folder name twice (two runs' final/) must not merge two columns
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def pick_tokenizer(model_dirs: list[Path], explicit: str | os.PathLike | None = None):
    """The tokenizer every model is scored with: `explicit`, else the models' own (they must agree)."""
    from ..models.io import TOKENIZER_FILES
    from ..tokenizer import load_tokenizer, tokenizer_fingerprint

    if explicit is not None:
        return load_tokenizer(explicit)
    with_files = [d for d in model_dirs if any((d / f).is_file() for f in TOKENIZER_FILES)]
    if not with_files:
        raise ValueError(f"no tokenizer files in {model_dirs[0]}; pass --tokenizer")
    tok = load_tokenizer(with_files[0])
    for d in with_files[1:]:
        if tokenizer_fingerprint(load_tokenizer(d)) != tokenizer_fingerprint(tok):
            raise ValueError(f"{d} and {with_files[0]} have different tokenizers; per-token CE is only "
                             "comparable with one tokenizer (pass --tokenizer to force one)")
    return tok


def run_eval(sources: list[str], data: list[str], *, names: list[str] | None = None, tokenizer: Any = None,
             ctx: int | None = None, max_tokens: int | None = None, dtype: str = "fp32", batch_size: int = 8,
             kl_reference: str | None = None, tasks: list[str] | None = None, limit: int | float | None = None,
             include_path: str | None = None, device: str | None = None, top_k: int = 5,
             cache_root: str | os.PathLike | None = None, baseline: str | None = None,
             progress: bool = True, num_fewshot: int | None = None, output_path: str | os.PathLike | None = None,
             log_samples: bool = False) -> dict[str, Any]:
    """Load models and datasets by name, check them all, then CE on every dataset and lm-eval benchmarks.
    `batch_size` "auto" lets lm-eval size its batches (CE then uses 8); `output_path` / `log_samples` write
    lm-eval's own result files, one folder per model."""
    from ..models import load_model
    from ..run.config import AT_LEAST_0, Range, check_value
    from ..sources import resolve_model_dir

    if not data and not tasks:
        raise ValueError("nothing to evaluate: give --data and/or --tasks")
    lm_eval_batch = batch_size
    if batch_size == "auto":
        batch_size = 8
    device = check_eval_numbers(batch_size, max_tokens, ctx, device)
    check_value("--top-k", top_k, AT_LEAST_0)
    if num_fewshot is not None:
        check_value("--num-fewshot", num_fewshot, AT_LEAST_0)
    if limit is not None:
        check_value("--limit", limit, Range(0, low_open=True))
    if log_samples and not output_path:
        raise ValueError("--log-samples needs --output-path (where lm-eval writes the samples)")
    for name in data:  # refuse a typo before downloading or tokenizing anything
        check_dataset_name(name)
    labels = model_labels(sources, names)
    if baseline is not None and baseline not in labels:  # checked now, not after an hour of evaluation
        raise ValueError(f"--baseline {baseline!r} is not one of the models: {', '.join(labels)}")
    dirs = [resolve_model_dir(s) for s in sources]
    results: dict[str, Any] = {"models": {}, "ce": {}, "benchmarks": {}}
    if data:
        # models first: a damaged config.json is named as such, not taken for a missing tokenizer
        models = {label: load_model(d, dtype=torch.float32) for label, d in zip(labels, dirs, strict=True)}
        tok = pick_tokenizer(dirs, tokenizer)
        reference = load_model(resolve_model_dir(kl_reference), dtype=torch.float32) if kl_reference else None
        caches = {name: load_eval_data(name, tok, cache_root=cache_root, progress=progress) for name in data}
        results = compare(models, caches, ctx=ctx, batch_size=batch_size, max_tokens=max_tokens, dtype=dtype,
                          reference=reference, top_k=top_k, device=device, progress=progress)
        results["protocol"]["kl_reference"] = kl_reference
        del models, reference
    for label, d in zip(labels, dirs, strict=True):
        results["models"].setdefault(label, {})["source"] = str(d)
    if tasks:
        from .lmeval import run_benchmarks

        for label, d in zip(labels, dirs, strict=True):
            scores = run_benchmarks(d, tasks, limit=limit, include_path=include_path, tokenizer=tokenizer,
                                    batch_size=lm_eval_batch, device=device, dtype=dtype, num_fewshot=num_fewshot,
                                    log_samples=log_samples,
                                    output_path=Path(output_path) / label if output_path else None)
            for task, row in scores.items():
                results["benchmarks"].setdefault(task, {})[label] = row
        results["benchmark_settings"] = {"harness": "lm-evaluation-harness", "limit": limit,
                                         "num_fewshot": num_fewshot, "output_path": str(output_path or "")}
    return results
