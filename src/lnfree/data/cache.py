"""Tokenization (in-process or in worker processes) and the memmap token cache: ``build_token_cache``,
``TokenCache`` and the cache's ``manifest.json``. See ``lnfree.data`` for the protocol and file format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from lnfree.jsonfile import atomic_write, read_json
from lnfree.tokenizer import tokenizer_fingerprint

from .pool import DocumentTokenizer, Piece, hash_into, run_tasks
from .sources import (
    _HUB_BATCH_ROWS,
    MANIFEST_FILE,
    TOKENS_FILE,
    DataSourceError,
    _hub_column,
    _load_hub_dataset,
    _resolve_source,
    _slug,
    _Source,
)

CACHE_FORMAT = "lnfree-token-cache"
CACHE_FORMAT_VERSION = 1

_FILE_TASK_BYTES = 8 << 20  # group small files into ~8 MB tasks so worker round-trips stay cheap
_FILE_TASK_MAX_FILES = 64
_SKIP_EXAMPLES_KEPT = 20


class TokenCacheMismatchError(ValueError):
    """An existing token cache was made with a different tokenizer (or split) than the one requested."""


def _file_tasks(files: Iterable[Path]) -> Iterator[list[Path]]:
    """Group files into tasks of about ``_FILE_TASK_BYTES`` (a single large file is its own task)."""
    task: list[Path] = []
    size = 0
    for path in files:
        task.append(path)
        size += path.stat().st_size
        if size >= _FILE_TASK_BYTES or len(task) >= _FILE_TASK_MAX_FILES:
            yield task
            task, size = [], 0
    if task:
        yield task


def _pretokenized_pieces(rows: list[Any], dtype: np.dtype, vocab_size: int, repo: str) -> list[Piece]:
    """Rows of an already tokenized dataset, concatenated as they are (they already contain EOTs)."""
    pieces = []
    for row in rows:
        ids = np.asarray(row, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DataSourceError(
                f"{repo!r} has token id {int(ids.max())} outside the tokenizer's {vocab_size} ids; "
                "pass the tokenizer the dataset was made with"
            )
        pieces.append(Piece(tokens=ids.astype(dtype)) if ids.size else Piece())
    return pieces


def _source_pieces(
    resolved: _Source, split: str, doc_tokenizer: DocumentTokenizer, vocab_size: int, num_proc: int
) -> tuple[Iterator[tuple[int, list[Piece]]], int | None, bool]:
    """(chunks of pieces, expected total for the progress bar, whether the data was pre-tokenized)."""
    if resolved.kind == "files":
        tasks = list(_file_tasks(resolved.files))
        chunks = run_tasks(doc_tokenizer, "files_task", tasks, min(num_proc, len(tasks)))
        return chunks, len(resolved.files), False
    spec = resolved.hub
    dataset = _load_hub_dataset(spec, split, num_proc)
    column = _hub_column(dataset, spec)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    batches = (b[column] for b in dataset.select_columns([column]).iter(batch_size=_HUB_BATCH_ROWS))
    if column == "text":
        return run_tasks(doc_tokenizer, "texts_task", batches, num_proc), total, False
    if spec.expected_vocab is not None and vocab_size != spec.expected_vocab:
        raise DataSourceError(
            f"{spec.repo!r} holds ids from a {spec.expected_vocab}-token vocabulary (GPT-2) but the "
            f"tokenizer has {vocab_size}; pass the gpt2 tokenizer"
        )
    chunks = ((len(rows), _pretokenized_pieces(rows, doc_tokenizer.dtype, vocab_size, spec.repo)) for rows in batches)
    return chunks, total, True


# --------------------------------------------------------------------------------------------------------
# Token cache
# --------------------------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """``$LNFREE_CACHE`` if set, else ``~/.cache/lnfree/tokens``."""
    env = os.environ.get("LNFREE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lnfree" / "tokens"


class TokenCache:
    """A built token stream: ``tokens`` (read-only memmap) and ``manifest`` (dict), cut into sequences."""

    def __init__(self, path: Path, manifest: dict[str, Any], tokens: np.memmap):
        self.path = path
        self.manifest = manifest
        self.tokens = tokens

    @classmethod
    def open(cls, path: str | os.PathLike[str], tokenizer: Any = None) -> TokenCache:
        """Open a complete cache folder; with ``tokenizer``, refuse one built with a different tokenizer."""
        folder = Path(path)
        manifest = _read_valid_manifest(folder)
        if manifest is None:
            raise DataSourceError(f"{folder} is not a complete lnfree token cache (no valid {MANIFEST_FILE})")
        cache = cls(folder, manifest, _open_tokens(folder, manifest))
        if tokenizer is not None:
            cache.check_tokenizer(tokenizer)
        return cache

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ``TokenCacheMismatchError`` unless ``tokenizer`` is the one the cache was built with."""
        requested = tokenizer_fingerprint(tokenizer)
        if requested != self.fingerprint:
            raise TokenCacheMismatchError(
                f"token cache {self.path} was built with tokenizer {self.fingerprint}, but the requested "
                f"tokenizer is {requested}; use the model's matching tokenizer or build a new cache for it"
            )
        if tokenizer.eos_token_id != self.eot_id:
            raise TokenCacheMismatchError(
                f"token cache {self.path} uses EOT id {self.eot_id}, but the requested tokenizer's "
                f"eos_token_id is {tokenizer.eos_token_id}; build a new cache for this tokenizer"
            )

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer_fingerprint"]

    @property
    def eot_id(self) -> int:
        return int(self.manifest["eot_id"])

    @property
    def token_count(self) -> int:
        return int(self.manifest["token_count"])

    @property
    def data_id(self) -> int:
        """48-bit int from the tokens' sha256: identifies the exact stream in JSON-friendly form."""
        return int(self.manifest["tokens_sha256"][:12], 16)

    def prefix_id(self, n_tokens: int) -> int:
        """Like `data_id`, for the first `n_tokens` tokens only (hashed once per cache object: ~1 s per GB)."""
        cached = self.__dict__.setdefault("_prefix_ids", {})
        if n_tokens not in cached:
            digest = hashlib.sha256(np.asarray(self.tokens[:n_tokens]).tobytes())
            cached[n_tokens] = int(digest.hexdigest()[:12], 16)
        return cached[n_tokens]

    def n_sequences(self, ctx: int) -> int:
        """Number of complete, non-overlapping ``ctx``-token sequences (the incomplete tail is dropped)."""
        if ctx < 1:
            raise ValueError(f"ctx must be positive, got {ctx}")
        return self.token_count // ctx

    def sequence(self, i: int, ctx: int) -> np.ndarray:
        """Sequence ``i`` as int64 ids: tokens ``[i*ctx, (i+1)*ctx)`` of the stream, no BOS added."""
        n = self.n_sequences(ctx)
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range: the cache has {n} sequences of ctx={ctx}")
        return np.asarray(self.tokens[i * ctx : (i + 1) * ctx], dtype=np.int64)

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"TokenCache({str(self.path)!r}, source={m['source']!r}, split={m['split']!r}, tokens={m['token_count']})"
        )


def build_token_cache(
    source: str,
    tokenizer: Any,
    split: str = "train",
    cache_root: str | os.PathLike[str] | None = None,
    max_documents: int | None = None,
    max_tokens: int | None = None,
    num_proc: int | None = None,
    progress: bool = True,
    need_tokens: int | None = None,
    sample_seed: int = 0,
) -> TokenCache:
    """Tokenize ``source``/``split`` with ``tokenizer`` into a token cache, or return the existing one.

    ``max_documents`` keeps the first N non-empty documents (rows for hub and pre-tokenized data);
    ``max_tokens`` cuts the stream to exactly N tokens. ``need_tokens`` instead makes (or grows) a *sampled*
    cache (see ``lnfree.data.sample``): a ``sample_seed``-ed random subset of documents covering at least that
    many tokens. ``num_proc`` (default: CPU count, at most 8) only changes speed, never the bytes written.
    ``source`` may also be an existing cache folder, which is reused after checking that it was made with
    ``tokenizer`` and holds ``split``.
    """
    _check_limit("max_documents", max_documents)
    _check_limit("max_tokens", max_tokens)
    _check_limit("need_tokens", need_tokens)
    fingerprint = tokenizer_fingerprint(tokenizer)
    resolved = _resolve_source(source, split)
    if resolved.kind == "cache":
        return _reuse_cache_folder(resolved.root, tokenizer, split, max_documents, max_tokens)
    if need_tokens is not None:
        if max_documents is not None or max_tokens is not None:
            raise ValueError("need_tokens (a sampled cache) cannot be combined with max_documents/max_tokens")
        sampled = _sampled_cache(resolved, tokenizer, source, split, cache_root, need_tokens, sample_seed, num_proc,
                                 progress)
        if sampled is not None:
            return sampled
        max_tokens = need_tokens  # no random access to documents (streaming hub data): read a prefix instead

    key = {
        "format_version": CACHE_FORMAT_VERSION,
        "source": resolved.ident,
        "split": split,
        "tokenizer_fingerprint": fingerprint,
        # eos_token lives in tokenizer_config.json, outside the backend JSON the fingerprint hashes.
        "eot_id": tokenizer.eos_token_id,
        "max_documents": max_documents,
        "max_tokens": max_tokens,
        "content_signature": resolved.signature,
    }
    key_digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    folder = root / f"{resolved.slug}-{_slug(split)}-{key_digest}"
    if _read_valid_manifest(folder) is None:
        manifest = _build(resolved, tokenizer, source, split, folder, max_documents, max_tokens, num_proc, progress)
        manifest.update(tokenizer_fingerprint=fingerprint, cache_key=key, cache_key_digest=key_digest)
        atomic_write(folder / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return TokenCache.open(folder, tokenizer)


def _sampled_cache(resolved: _Source, tokenizer: Any, source: str, split: str, cache_root: Any, need: int, seed: int,
                   num_proc: int | None, progress: bool) -> TokenCache | None:
    """The sampled cache of (source, split, tokenizer, seed), grown to cover `need` tokens; None when the source
    cannot be sampled."""
    from . import sample

    fingerprint = tokenizer_fingerprint(tokenizer)
    key = {"format_version": CACHE_FORMAT_VERSION, "source": resolved.ident, "split": split,
           "tokenizer_fingerprint": fingerprint, "eot_id": tokenizer.eos_token_id, "sample_seed": seed,
           "content_signature": resolved.signature}
    key_digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    folder = root / f"{resolved.slug}-{_slug(split)}-sample{seed}-{key_digest}"
    doc_tokenizer = _document_tokenizer(tokenizer, resolved)
    with sample.folder_lock(folder):
        manifest = _read_valid_manifest(folder)
        if not sample.covers(manifest, need):
            base = {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "source": source,
                    "source_resolved": resolved.ident, "split": split,
                    "tokenizer_name": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer),
                    "eot_id": doc_tokenizer.eot_id, "dtype": doc_tokenizer.dtype.name, "byteorder": "little",
                    "pretokenized": False, "max_documents": None, "max_tokens": None,
                    "tokenizer_fingerprint": fingerprint, "cache_key": key, "cache_key_digest": key_digest}
            workers = num_proc if num_proc is not None else _default_num_proc()
            try:
                manifest = sample.build_or_extend(resolved, doc_tokenizer, source, split, folder, need, seed,
                                                  manifest, base, workers, progress)
            except sample.NotSampleable:
                manifest = None
            else:
                (folder / MANIFEST_FILE).unlink(missing_ok=True)
                sample.write_manifest(folder, manifest)
        if manifest is not None:  # opened under the lock: another run may be appending to tokens.bin later
            return TokenCache.open(folder, tokenizer)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _document_tokenizer(tokenizer: Any, resolved: _Source) -> DocumentTokenizer:
    vocab_size = len(tokenizer)
    dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    eot_id = tokenizer.eos_token_id
    if eot_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token to use as EOT")
    return DocumentTokenizer(tokenizer, int(eot_id), dtype, resolved.root)


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _reuse_cache_folder(
    folder: Path, tokenizer: Any, split: str, max_documents: int | None, max_tokens: int | None
) -> TokenCache:
    if max_documents is not None or max_tokens is not None:
        raise ValueError(f"{folder} is an existing token cache; max_documents/max_tokens cannot be applied to it")
    cache = TokenCache.open(folder, tokenizer)
    if cache.manifest["split"] != split:
        raise TokenCacheMismatchError(
            f"token cache {folder} holds split {cache.manifest['split']!r}, not the requested {split!r}; "
            f"pass split={cache.manifest['split']!r} or the matching cache"
        )
    return cache


@dataclass
class _BuildStats:
    token_count: int = 0
    n_documents: int = 0
    empty_documents: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _build(
    resolved: _Source,
    tokenizer: Any,
    source: str,
    split: str,
    folder: Path,
    max_documents: int | None,
    max_tokens: int | None,
    num_proc: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Write ``tokens.bin`` atomically and return the manifest without its key fields (the caller adds them
    and writes it last, which is what marks the cache complete)."""
    vocab_size = len(tokenizer)
    doc_tokenizer = _document_tokenizer(tokenizer, resolved)
    dtype, eot_id = doc_tokenizer.dtype, doc_tokenizer.eot_id
    workers = num_proc if num_proc is not None else _default_num_proc()

    # Open the source before touching the cache folder: an unreadable source (hub offline) leaves nothing.
    chunks, total, pretokenized = _source_pieces(resolved, split, doc_tokenizer, vocab_size, workers)
    bar = tqdm(
        total=total,
        unit="doc" if resolved.kind == "hub" else "file",
        desc=f"tokenizing {source}:{split}",
        disable=not progress,
    )
    with contextlib.closing(chunks), bar:
        stats, sha256 = _write_tokens_file(folder, chunks, max_documents, max_tokens, bar)
    if stats.token_count == 0:
        raise DataSourceError(_nothing_usable_message(source, split, stats))
    return {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "source": source,
        "source_resolved": resolved.ident,
        "split": split,
        "tokenizer_name": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": vocab_size,
        "eot_id": int(eot_id),
        "token_count": stats.token_count,
        "dtype": dtype.name,
        "byteorder": "little",
        "n_documents": stats.n_documents,
        "empty_documents": stats.empty_documents,
        "skipped_files": len(stats.skipped),
        "skipped_examples": [f"{name} ({why})" for name, why in stats.skipped[:_SKIP_EXAMPLES_KEPT]],
        "pretokenized": pretokenized,
        "max_documents": max_documents,
        "max_tokens": max_tokens,
        "tokens_sha256": sha256,
    }


def _write_tokens_file(
    folder: Path,
    chunks: Iterator[tuple[int, list[Piece]]],
    max_documents: int | None,
    max_tokens: int | None,
    bar: Any,
) -> tuple[_BuildStats, str]:
    """Stream the documents into a temp file and move it to ``tokens.bin`` only once it is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_FILE).unlink(missing_ok=True)  # an invalid old manifest must not outlive new tokens
    tmp = folder / f"{TOKENS_FILE}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as out:
            stats, sha256 = _write_stream(chunks, out, max_documents, max_tokens, bar)
            out.flush()
            os.fsync(out.fileno())
        if stats.token_count:
            os.replace(tmp, folder / TOKENS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when the build failed before anything was kept
    return stats, sha256


def _write_stream(
    chunks: Iterator[tuple[int, list[Piece]]],
    out: BinaryIO,
    max_documents: int | None,
    max_tokens: int | None,
    bar: Any,
) -> tuple[_BuildStats, str]:
    """Append documents to ``out`` in order until the source or a limit runs out; (stats, sha256)."""
    stats = _BuildStats()
    digest = hashlib.sha256()
    for size, pieces in chunks:
        for piece in pieces:
            if piece.skipped is not None:
                stats.skipped.append(piece.skipped)
                continue
            if piece.tokens is None:
                stats.empty_documents += 1
                continue
            tokens = piece.tokens if max_tokens is None else piece.tokens[: max_tokens - stats.token_count]
            data = tokens.tobytes()
            out.write(data)
            digest.update(data)
            stats.token_count += len(tokens)
            stats.n_documents += 1
            if stats.n_documents == max_documents or stats.token_count == max_tokens:
                return stats, digest.hexdigest()
        bar.update(size)
        bar.set_postfix(tokens=stats.token_count, refresh=False)
    return stats, digest.hexdigest()


def _nothing_usable_message(source: str, split: str, stats: _BuildStats) -> str:
    examples = ", ".join(f"{name} ({why})" for name, why in stats.skipped[:3])
    return (
        f"no usable documents in {source!r} split {split!r}: {len(stats.skipped)} files skipped as "
        f"empty/binary/non-UTF-8{': ' + examples if examples else ''}, {stats.empty_documents} empty rows"
    )


def _default_num_proc() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _read_valid_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest if ``folder`` holds a complete, intact cache of this format, else None (rebuild it)."""
    try:
        manifest = read_json(folder / MANIFEST_FILE)
        complete = (
            manifest.get("format") == CACHE_FORMAT
            and manifest.get("format_version") == CACHE_FORMAT_VERSION
            and (folder / TOKENS_FILE).stat().st_size
            == int(manifest["token_count"]) * np.dtype(manifest["dtype"]).itemsize
        )
        if complete and (folder / TOKENS_FILE).stat().st_size <= VERIFY_HASH_BYTES:
            complete = _file_sha256(folder / TOKENS_FILE) == manifest["tokens_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if complete else None


# A cache this small is checked against its sha256 at every open (well under a second); a larger one only has
# each batch's ids checked against the vocabulary as they are read (SequenceSampler), which catches what would
# crash the embedding, not an in-range corruption.
VERIFY_HASH_BYTES = 64 * 2**20


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hash_into(hashlib.sha256(), f).hexdigest()


def _open_tokens(folder: Path, manifest: dict[str, Any]) -> np.memmap:
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    return np.memmap(folder / TOKENS_FILE, dtype=dtype, mode="r", shape=(int(manifest["token_count"]),))
