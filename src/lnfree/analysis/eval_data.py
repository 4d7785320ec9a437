"""Evaluation data by name: the datasets the papers evaluate on (`owt-val`, `pile`, …) or a local file, folder or
token cache; the checks that a model can read them, made before any compute; and the protocol's sequence batches
over them (non-overlapping `ctx`-token sequences in order, every one scored, see `evaluate.py`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .evaluate import model_context

DEFAULT_CTX = 1024


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


def eval_batches(cache: Any, ctx: int, batch_size: int, max_tokens: int | None) -> tuple[Iterator[Tensor], int, int]:
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
