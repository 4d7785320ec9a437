"""Many models on many datasets, by name — what `lnfree eval` runs: models loaded and labelled, one tokenizer for
all, every dataset checked against every model before any compute, then the protocol's CE of each (`evaluate.py`) on
the same sequences, and lm-eval benchmarks (`lmeval.py`); the results dict `tables.py` lays out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..method.fold import normalising_sites
from .eval_data import (
    check_compatible,
    check_dataset_name,
    check_eval_numbers,
    default_ctx,
    eval_batches,
    load_eval_data,
)
from .evaluate import evaluate_ce, model_context, model_device


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
            batches, n_batches, bs = eval_batches(cache, ctx, batch_size, max_tokens)
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
            "live_norm_sites": len(normalising_sites(model)) if hasattr(model, "norm_sites") else None,
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
