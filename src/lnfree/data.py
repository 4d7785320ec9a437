"""Token caches and sequence sampling for LayerNorm-removal fine-tuning and evaluation.

Protocol (Heimersheim 2024; Baroni et al. 2025): every document is tokenized with the model's own tokenizer,
followed by one EOT token (``tok.eos_token_id``); documents are concatenated into one flat stream, which is
cut into non-overlapping ``ctx``-token sequences with no BOS prepended (the last incomplete one is dropped).
The loss is computed within each sequence (ctx - 1 predictions); EOT is an ordinary token and target, so
nothing here masks it.

The stream is stored once per (source, split, tokenizer, limits) as ``tokens.bin`` (flat little-endian
uint16, or uint32 for vocabularies over 65536 ids) plus ``manifest.json``. The manifest is written last and
both files are moved into place with ``os.replace``, so a killed build never looks complete. Building is
deterministic: the same inputs give a byte-identical ``tokens.bin`` whatever ``num_proc`` is.

Sources (one string):
  * ``stdlib``: the ``.py`` files of the running interpreter's standard library (works offline);
  * a local file or folder of ``.txt``/``.py``/``.md`` (one document per file), ``.jsonl`` (field ``text``)
    or ``.parquet`` (column ``text``);
  * a hub dataset: ``openwebtext``, ``pile``, ``pile-filtered``, the pre-tokenized
    ``apollo-research/monology-pile-uncopyrighted-tokenizer-gpt2``, or any ``owner/name``;
  * an existing token-cache folder (reused as is after checking its tokenizer fingerprint).
Local sources and ``stdlib`` are split into train/val by file (a hash of the path picks ~3% for val), so
the split never depends on which other files exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import secrets
import socket
import sysconfig
import urllib.parse
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from lnfree.tokenizer import _first_line, tokenizer_fingerprint

if TYPE_CHECKING:  # torch is imported lazily so tokenizer worker processes start fast.
    import torch

VAL_FRACTION = 0.03
SPLITS = ("train", "val", "all")
TEXT_SUFFIXES = (".txt", ".py", ".md")
ROW_SUFFIXES = (".jsonl", ".parquet")
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
FOLDER_EXCLUDED_DIRS = frozenset({"__pycache__"})

CACHE_FORMAT = "lnfree-token-cache"
CACHE_FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
MANIFEST_FILE = "manifest.json"

# nanoGPT's openwebtext split, used by both papers: val is 0.05% of the hub "train" split.
OPENWEBTEXT_VAL_FRACTION = 0.0005
OPENWEBTEXT_SPLIT_SEED = 2357

_FILE_TASK_BYTES = 8 << 20  # group small files into ~8 MB tasks so worker round-trips stay cheap
_FILE_TASK_MAX_FILES = 64
_HUB_BATCH_ROWS = 1000
_SKIP_EXAMPLES_KEPT = 20
_HUB_PROBE_TIMEOUT_S = 3.0
_OFFLINE_HINT = "offline sources that work: 'stdlib' or a local file/folder of .txt/.py/.md/.jsonl/.parquet"


class DataSourceError(RuntimeError):
    """A data source cannot be resolved or read; the message is one line that says what to do."""


class TokenCacheMismatchError(ValueError):
    """An existing token cache was made with a different tokenizer (or split) than the one requested."""


# --------------------------------------------------------------------------------------------------------
# Files: discovery and train/val split
# --------------------------------------------------------------------------------------------------------


def split_of(relative_path: str) -> str:
    """``"val"`` for ~3% of paths, else ``"train"``, decided only by the path relative to its source root.

    Hashing the path (not shuffling a list) keeps a file in the same split when files are added or removed.
    """
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:4], "big") / 2**32
    return "val" if bucket < VAL_FRACTION else "train"


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder (the base interpreter's, also inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def list_source_files(source: str, split: str = "all") -> list[Path]:
    """Files of a local source (``"stdlib"``, a folder or a file) in ``split``, sorted for determinism."""
    root, files = _local_files(source)
    return _select_split(root, files, split, source)


def _local_files(source: str) -> tuple[Path, list[Path]]:
    """(root, all candidate files) for ``stdlib`` or an existing local path."""
    if source == "stdlib":
        root = stdlib_root()
        return root, _walk_files(root, (".py",), STDLIB_EXCLUDED_DIRS)
    path = Path(source).expanduser().resolve()
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES + ROW_SUFFIXES:
            raise DataSourceError(f"unsupported file type {path.suffix!r} for {path}; use .txt/.py/.md/.jsonl/.parquet")
        return path.parent, [path]
    if path.is_dir():
        return path, _walk_files(path, TEXT_SUFFIXES + ROW_SUFFIXES, FOLDER_EXCLUDED_DIRS)
    raise DataSourceError(f"no local file or folder {source!r}")


def _walk_files(root: Path, suffixes: tuple[str, ...], excluded_dirs: frozenset[str]) -> list[Path]:
    """Matching files under ``root``, skipping hidden entries (.git, editor backups) and excluded folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in excluded_dirs]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(suffixes):
                found.append(Path(dirpath, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _select_split(root: Path, files: list[Path], split: str, source: str) -> list[Path]:
    if split not in SPLITS:
        raise DataSourceError(f"unknown split {split!r} for local source {source!r}; use one of {SPLITS}")
    if source != "stdlib" and Path(source).expanduser().is_file():
        # A single file cannot be split by file: it is the training data (or everything).
        if split == "val":
            raise DataSourceError(
                f"{source!r} is a single file, which cannot be split by file; pass a separate val file "
                "(as split='all') or a folder"
            )
        return files
    if split == "all":
        return files
    return [p for p in files if split_of(p.relative_to(root).as_posix()) == split]


def _content_signature(root: Path, files: list[Path]) -> str:
    """Cheap identity of local inputs (path, size, mtime) so an edited folder never reuses a stale cache."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Files: reading documents
# --------------------------------------------------------------------------------------------------------


@dataclass
class FileDocuments:
    """The documents of one file; ``skip_reason`` is set (and no documents) when the file is unusable."""

    path: Path
    documents: list[str] = field(default_factory=list)
    skip_reason: str | None = None
    empty_documents: int = 0  # empty rows inside a .jsonl/.parquet file


def read_file_documents(path: Path) -> FileDocuments:
    """Read one source file: whole-file text for .txt/.py/.md, one document per row for .jsonl/.parquet."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path)
    text, reason = _decode_text(path.read_bytes())
    if text is None:
        return FileDocuments(path, skip_reason=reason)
    if path.suffix.lower() == ".jsonl":
        return _parse_jsonl(path, text)
    return FileDocuments(path, [text])


def _decode_text(raw: bytes) -> tuple[str | None, str | None]:
    """(text, None) for usable UTF-8 text, else (None, why it is skipped)."""
    if not raw.strip():
        return None, "empty"
    if b"\x00" in raw:  # UTF-8 text never contains NUL; this catches binaries and UTF-16 files
        return None, "binary (NUL bytes)"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    return (text, None) if text.strip() else (None, "empty")


def _parse_jsonl(path: Path, text: str) -> FileDocuments:
    result = FileDocuments(path)
    # split("\n"), not splitlines(): JSON strings may legally contain U+2028 and other line separators.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataSourceError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
        if not isinstance(row, dict) or "text" not in row:
            raise DataSourceError(f"{path}:{lineno}: each .jsonl line must be an object with a 'text' field")
        _add_row_text(result, row["text"], f"{path}:{lineno}")
    return _mark_if_empty(result)


def _read_parquet(path: Path) -> FileDocuments:
    if path.stat().st_size == 0:
        return FileDocuments(path, skip_reason="empty")
    texts = _parquet_texts(path)
    if texts is None:
        return FileDocuments(path, skip_reason="not a readable parquet file")
    result = FileDocuments(path)
    for i, value in enumerate(texts):
        _add_row_text(result, value, f"{path}: row {i}")
    return _mark_if_empty(result)


def _parquet_texts(path: Path) -> list[Any] | None:
    """Column ``text`` of a parquet file (pyarrow if installed, else datasets); None if unreadable."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        try:
            schema = pq.read_schema(path)
        except Exception:  # noqa: BLE001 - any parse failure means "not parquet": skip and count it
            return None
        if "text" not in schema.names:
            raise DataSourceError(f"{path}: parquet file has no 'text' column (columns: {schema.names})")
        return pq.read_table(path, columns=["text"]).column("text").to_pylist()
    from datasets import Dataset

    try:
        table = Dataset.from_parquet(str(path))
    except Exception:  # noqa: BLE001
        return None
    if "text" not in table.column_names:
        raise DataSourceError(f"{path}: parquet file has no 'text' column (columns: {table.column_names})")
    return table["text"]


def _add_row_text(result: FileDocuments, value: Any, where: str) -> None:
    if value is None or value == "":
        result.empty_documents += 1
    elif isinstance(value, str):
        result.documents.append(value)
    else:
        raise DataSourceError(f"{where}: 'text' must be a string, got {type(value).__name__}")


def _mark_if_empty(result: FileDocuments) -> FileDocuments:
    if not result.documents:
        result.skip_reason = "no non-empty 'text' rows"
    return result


# --------------------------------------------------------------------------------------------------------
# Hub sources
# --------------------------------------------------------------------------------------------------------

_GENERIC_SPLITS: dict[str, tuple[str, ...]] = {"train": ("train",), "val": ("validation", "val", "test")}


@dataclass(frozen=True)
class HubSpec:
    """How to read one hub dataset. ``splits`` maps an lnfree split to hub splits tried in order."""

    repo: str
    splits: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(_GENERIC_SPLITS))
    streaming: bool = False
    carve_val_from_train: bool = False  # openwebtext only has "train"; val is carved out like nanoGPT
    expected_vocab: int | None = None  # pre-tokenized data: the vocabulary size its ids come from
    passthrough_splits: bool = False  # unknown split names (e.g. "train[:1%]") go to the hub unchanged


_OPENWEBTEXT = HubSpec("Skylion007/openwebtext", carve_val_from_train=True)
_PILE = HubSpec("monology/pile-uncopyrighted", streaming=True)
_APOLLO_PILE_GPT2 = HubSpec(
    "apollo-research/monology-pile-uncopyrighted-tokenizer-gpt2", streaming=True, expected_vocab=50257
)
# Baroni et al.'s evaluation set (first 10k rows): all of it is evaluation data, so only "val" reads it,
# from a validation/test split if the hub has one, else from its "train" split.
_PILE_FILTERED = HubSpec("lucabaroni/apollo-pile-filtered-10k", splits={"val": ("validation", "test", "train")})

HUB_ALIASES: dict[str, HubSpec] = {
    "openwebtext": _OPENWEBTEXT,
    _OPENWEBTEXT.repo: _OPENWEBTEXT,
    "pile": _PILE,
    _PILE.repo: _PILE,
    _APOLLO_PILE_GPT2.repo: _APOLLO_PILE_GPT2,
    "pile-filtered": _PILE_FILTERED,
    _PILE_FILTERED.repo: _PILE_FILTERED,
}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_spec(source: str) -> HubSpec | None:
    """The reading recipe for a hub name or alias, or None when ``source`` does not look like one."""
    if source in HUB_ALIASES:
        return HUB_ALIASES[source]
    if _HUB_NAME.match(source):
        return HubSpec(source, passthrough_splits=True)
    return None


def hub_aliases() -> list[str]:
    """Short names accepted as sources besides ``owner/name`` (for CLI help and error messages)."""
    return [name for name in HUB_ALIASES if "/" not in name]


def _hub_offline_requested() -> bool:
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for name in names)


def _hub_reachable() -> bool:
    """One TCP connect to the hub endpoint: without it, datasets retries an unreachable hub for ~30 s."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides reachability; let datasets try
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_flags(offline: bool) -> Iterator[None]:
    """Force datasets/huggingface_hub into offline mode for one load.

    Both libraries read HF_HUB_OFFLINE once, at import; when it is set later (tests, notebooks) or the hub
    is unreachable, flipping their module flags makes the load use the local cache or fail immediately.
    """
    if not offline:
        yield
        return
    import datasets.config as datasets_config
    from huggingface_hub import constants as hub_constants

    flags = [
        (datasets_config, "HF_HUB_OFFLINE"),
        (datasets_config, "HF_DATASETS_OFFLINE"),
        (hub_constants, "HF_HUB_OFFLINE"),
    ]
    flags = [(module, name) for module, name in flags if hasattr(module, name)]
    saved = [getattr(module, name) for module, name in flags]
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved, strict=True):
            setattr(module, name, value)


def _load_hub_dataset(spec: HubSpec, split: str, num_proc: int) -> Any:
    """The hub dataset (a ``Dataset`` or streaming ``IterableDataset``) for an lnfree split."""
    offline_reason = None
    if _hub_offline_requested():
        offline_reason = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    elif not _hub_reachable():
        offline_reason = "the hub is unreachable"
    try:
        with _hub_offline_flags(offline_reason is not None):
            return _load_hub_split(spec, split, num_proc)
    except DataSourceError:
        raise
    except Exception as err:  # noqa: BLE001 - every loading failure becomes one actionable line
        why = f"{offline_reason} and it is not in the local HF cache" if offline_reason else _first_line(err)
        # An unknown owner/name may be a mistyped local path: say that no such path exists either.
        note = f"; no local path {spec.repo!r} exists either" if spec.passthrough_splits else ""
        raise DataSourceError(f"cannot load hub dataset {spec.repo!r} ({why}){note}; {_OFFLINE_HINT}") from err


def _load_hub_split(spec: HubSpec, split: str, num_proc: int) -> Any:
    from datasets import load_dataset

    def load(hub_split: str) -> Any:
        if spec.streaming:
            return load_dataset(spec.repo, split=hub_split, streaming=True)
        return load_dataset(spec.repo, split=hub_split, num_proc=num_proc if num_proc > 1 else None)

    if spec.carve_val_from_train:
        if split not in ("train", "val"):
            raise DataSourceError(f"{spec.repo!r} supports splits 'train' and 'val', not {split!r}")
        parts = load("train").train_test_split(
            test_size=OPENWEBTEXT_VAL_FRACTION, seed=OPENWEBTEXT_SPLIT_SEED, shuffle=True
        )
        return parts["test" if split == "val" else "train"]
    candidates = spec.splits.get(split) or ((split,) if spec.passthrough_splits else ())
    if not candidates:
        raise DataSourceError(f"{spec.repo!r} has no lnfree split {split!r}; use one of {sorted(spec.splits)}")
    for hub_split in candidates[:-1]:
        try:
            return load(hub_split)
        except ValueError:  # datasets raises ValueError for an unknown split name: try the next one
            continue
    return load(candidates[-1])


def _hub_column(dataset: Any, spec: HubSpec) -> str:
    """``text`` for raw text, ``input_ids`` for pre-tokenized data."""
    columns = dataset.column_names
    if columns is None:  # some streaming datasets only know their columns after the first row
        columns = list(next(iter(dataset)).keys())
    for column in ("text", "input_ids"):
        if column in columns:
            return column
    raise DataSourceError(f"hub dataset {spec.repo!r} has neither a 'text' nor an 'input_ids' column: {columns}")


# --------------------------------------------------------------------------------------------------------
# Source resolution
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A resolved source. ``kind`` is "files", "hub" or "cache"."""

    kind: str
    ident: str  # what the cache key records: "stdlib", an absolute path or a hub repo
    slug: str  # readable prefix of the cache folder name
    root: Path | None = None
    files: tuple[Path, ...] = ()
    hub: HubSpec | None = None
    signature: str | None = None


def _resolve_source(source: str, split: str) -> _Source:
    """Decide what ``source`` names: ``stdlib``, a local path (cache folder or data), else a hub dataset."""
    local = Path(source).expanduser()
    if source == "stdlib" or local.exists():
        if source != "stdlib" and _is_token_cache_dir(local):
            return _Source("cache", str(local.resolve()), _slug(local.name), root=local.resolve())
        return _resolve_local(source, split)
    spec = hub_spec(source)
    if spec is None:
        raise DataSourceError(
            f"unknown data source {source!r}: not 'stdlib', not an existing local file/folder, and not a hub "
            f"name ({', '.join(hub_aliases())} or owner/name)"
        )
    return _Source("hub", spec.repo, _slug(spec.repo.replace("/", "--")), hub=spec)


def _resolve_local(source: str, split: str) -> _Source:
    root, files = _local_files(source)
    selected = _select_split(root, files, split, source)
    if not selected:
        raise DataSourceError(
            f"no .txt/.py/.md/.jsonl/.parquet files in split {split!r} of {source!r} ({len(files)} files "
            f"in all; ~{VAL_FRACTION:.0%} of files go to val by path hash); use split='all' or more files"
        )
    ident = "stdlib" if source == "stdlib" else str(Path(source).expanduser().resolve())
    return _Source(
        "files",
        ident,
        _slug(Path(ident).name),
        root,
        tuple(selected),
        signature=_content_signature(root, selected),
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:48] or "source"


def iter_documents(source: str, split: str = "train", max_documents: int | None = None) -> Iterator[str]:
    """Yield the raw text documents of a source (for example to train a tokenizer on ``stdlib`` train)."""
    resolved = _resolve_source(source, split)
    if resolved.kind == "cache":
        raise DataSourceError(f"{source!r} is a token cache; it holds token ids, not text")
    count = 0
    for texts in _source_texts(resolved, split, num_proc=1):
        for text in texts:
            if max_documents is not None and count >= max_documents:
                return
            count += 1
            yield text


def _source_texts(resolved: _Source, split: str, num_proc: int) -> Iterator[list[str]]:
    if resolved.kind == "files":
        for path in resolved.files:
            yield read_file_documents(path).documents
        return
    dataset = _load_hub_dataset(resolved.hub, split, num_proc)
    column = _hub_column(dataset, resolved.hub)
    if column != "text":
        raise DataSourceError(f"{resolved.ident!r} is pre-tokenized; it has no text documents")
    for batch in dataset.select_columns([column]).iter(batch_size=_HUB_BATCH_ROWS):
        yield [text for text in batch[column] if text]


# --------------------------------------------------------------------------------------------------------
# Tokenization (in-process or in a multiprocessing Pool)
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """One unit of tokenizer output, in source order: a document, a skipped file, or an empty row."""

    tokens: np.ndarray | None = None  # a document's ids, EOT appended
    skipped: tuple[str, str] | None = None  # (file, reason)


class _DocumentTokenizer:
    """Tokenizes documents into arrays of the cache dtype with EOT appended.

    Picklable (it holds the HF tokenizer), so each Pool worker gets its own copy once, at start-up.
    """

    def __init__(self, tokenizer: Any, eot_id: int, dtype: np.dtype, root: Path | None):
        self.tokenizer = tokenizer
        self.eot_id = eot_id
        self.dtype = dtype
        self.root = root

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Ids of each text plus EOT. Literal "<|endoftext|>" inside a text stays text, like GPT-2's
        ``encode_ordinary`` used to prepare openwebtext, so EOT ids mark document boundaries only."""
        if not texts:
            return []
        ids = self.tokenizer(
            texts,
            add_special_tokens=False,
            split_special_tokens=True,
            return_attention_mask=False,
            verbose=False,
        )["input_ids"]
        arrays = []
        for row in ids:
            array = np.empty(len(row) + 1, dtype=self.dtype)
            array[:-1] = row  # numpy raises OverflowError if an id does not fit the dtype
            array[-1] = self.eot_id
            arrays.append(array)
        return arrays

    def texts_task(self, texts: list[str | None]) -> list[_Piece]:
        arrays = iter(self.encode([t for t in texts if t]))
        return [_Piece(tokens=next(arrays)) if t else _Piece() for t in texts]

    def files_task(self, paths: list[Path]) -> list[_Piece]:
        pieces = []
        for path in paths:
            docs = read_file_documents(path)
            if docs.skip_reason is not None:
                shown = path.relative_to(self.root).as_posix() if self.root else str(path)
                pieces.append(_Piece(skipped=(shown, docs.skip_reason)))
                continue
            pieces.extend(_Piece(tokens=array) for array in self.encode(docs.documents))
            pieces.extend(_Piece() for _ in range(docs.empty_documents))
        return pieces


_WORKER: _DocumentTokenizer | None = None


def _init_worker(doc_tokenizer: _DocumentTokenizer) -> None:
    global _WORKER
    _WORKER = doc_tokenizer


def _run_worker_task(method: str, task: list[Any]) -> list[_Piece]:
    assert _WORKER is not None, "worker used before _init_worker"
    return getattr(_WORKER, method)(task)


@contextlib.contextmanager
def _env_override(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _run_tasks(
    doc_tokenizer: _DocumentTokenizer, method: str, tasks: Iterable[list[Any]], num_proc: int
) -> Iterator[tuple[int, list[_Piece]]]:
    """(task size, pieces) per task, in task order, so the output never depends on ``num_proc``.

    At most ``2 * num_proc`` tasks are in flight: a streaming source is never read far ahead of the
    tokenizer (``Pool.imap`` would drain it into memory), and stopping early at a limit wastes little work.
    """
    if num_proc <= 1:
        for task in tasks:
            yield len(task), getattr(doc_tokenizer, method)(task)
        return
    # Workers tokenize one batch each, single-threaded; setting this before they start also silences the
    # tokenizers fork warning when the parent has already used its thread pool.
    with _env_override("TOKENIZERS_PARALLELISM", "false"):
        pool = multiprocessing.get_context().Pool(num_proc, _init_worker, (doc_tokenizer,))
    with pool:  # leaving the block (also on early stop or error) terminates the workers
        pending: deque[tuple[int, Any]] = deque()
        for task in tasks:
            pending.append((len(task), pool.apply_async(_run_worker_task, (method, task))))
            if len(pending) >= 2 * num_proc:
                size, result = pending.popleft()
                yield size, result.get()
        while pending:
            size, result = pending.popleft()
            yield size, result.get()


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


def _pretokenized_pieces(rows: list[Any], dtype: np.dtype, vocab_size: int, repo: str) -> list[_Piece]:
    """Rows of an already tokenized dataset, concatenated as they are (they already contain EOTs)."""
    pieces = []
    for row in rows:
        ids = np.asarray(row, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DataSourceError(
                f"{repo!r} has token id {int(ids.max())} outside the tokenizer's {vocab_size} ids; "
                "pass the tokenizer the dataset was made with"
            )
        pieces.append(_Piece(tokens=ids.astype(dtype)) if ids.size else _Piece())
    return pieces


def _source_pieces(
    resolved: _Source, split: str, doc_tokenizer: _DocumentTokenizer, vocab_size: int, num_proc: int
) -> tuple[Iterator[tuple[int, list[_Piece]]], int | None, bool]:
    """(chunks of pieces, expected total for the progress bar, whether the data was pre-tokenized)."""
    if resolved.kind == "files":
        tasks = list(_file_tasks(resolved.files))
        chunks = _run_tasks(doc_tokenizer, "files_task", tasks, min(num_proc, len(tasks)))
        return chunks, len(resolved.files), False
    spec = resolved.hub
    dataset = _load_hub_dataset(spec, split, num_proc)
    column = _hub_column(dataset, spec)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    batches = (b[column] for b in dataset.select_columns([column]).iter(batch_size=_HUB_BATCH_ROWS))
    if column == "text":
        return _run_tasks(doc_tokenizer, "texts_task", batches, num_proc), total, False
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
) -> TokenCache:
    """Tokenize ``source``/``split`` with ``tokenizer`` into a token cache, or return the existing one.

    ``max_documents`` keeps the first N non-empty documents (rows for hub and pre-tokenized data);
    ``max_tokens`` cuts the stream to exactly N tokens. ``num_proc`` (default: CPU count, at most 8) only
    changes speed, never the bytes written. ``source`` may also be an existing cache folder, which is
    reused after checking that it was made with ``tokenizer`` and holds ``split``.
    """
    _check_limit("max_documents", max_documents)
    _check_limit("max_tokens", max_tokens)
    fingerprint = tokenizer_fingerprint(tokenizer)
    resolved = _resolve_source(source, split)
    if resolved.kind == "cache":
        return _reuse_cache_folder(resolved.root, tokenizer, split, max_documents, max_tokens)

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
        _atomic_write(folder / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return TokenCache.open(folder, tokenizer)


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
    dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    eot_id = tokenizer.eos_token_id
    if eot_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token to use as EOT")
    doc_tokenizer = _DocumentTokenizer(tokenizer, int(eot_id), dtype, resolved.root)
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
    chunks: Iterator[tuple[int, list[_Piece]]],
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
    chunks: Iterator[tuple[int, list[_Piece]]],
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


def _is_token_cache_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_FILE).is_file() and (path / TOKENS_FILE).exists()


def _read_valid_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest if ``folder`` holds a complete cache of this format, else None (rebuild it)."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        complete = (
            manifest.get("format") == CACHE_FORMAT
            and manifest.get("format_version") == CACHE_FORMAT_VERSION
            and (folder / TOKENS_FILE).stat().st_size
            == int(manifest["token_count"]) * np.dtype(manifest["dtype"]).itemsize
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if complete else None


def _open_tokens(folder: Path, manifest: dict[str, Any]) -> np.memmap:
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    return np.memmap(folder / TOKENS_FILE, dtype=dtype, mode="r", shape=(int(manifest["token_count"]),))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------
# Sequence sampling
# --------------------------------------------------------------------------------------------------------


class SequenceSampler:
    """Deterministic batches of ``ctx``-token sequences from a ``TokenCache``.

    With ``shuffle=True`` each epoch visits every sequence once, in a permutation drawn from a numpy
    Generator seeded by ``(seed, epoch)``; ``next_batch`` runs across epoch boundaries forever. The cursor
    (epoch, position) is all the state there is, so ``state_dict``/``load_state_dict`` (plain ints, saved
    as JSON in checkpoints) make a resumed run see exactly the batches the uninterrupted run would have.
    With ``shuffle=False`` the order is the stream order, for evaluation via ``iter_batches``.
    """

    def __init__(self, cache: TokenCache, ctx: int, seed: int = 0, shuffle: bool = True):
        if ctx < 2:
            raise ValueError(f"ctx must be at least 2 (a sequence needs one prediction), got {ctx}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.cache = cache
        self.ctx = ctx
        self.seed = seed
        self.shuffle = shuffle
        self.n_sequences = cache.n_sequences(ctx)
        if self.n_sequences == 0:
            raise ValueError(f"{cache.path} has {cache.token_count} tokens, fewer than one sequence of ctx={ctx}")
        self.epoch = 0
        self.position = 0  # index into the current epoch's order of the next sequence to hand out
        self._order_cache: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sequence indices of ``epoch`` in visiting order."""
        if not self.shuffle:
            return np.arange(self.n_sequences)
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order_cache = (epoch, rng.permutation(self.n_sequences))
        return self._order_cache[1]

    def next_batch(self, n: int) -> torch.Tensor:
        """The next ``n`` sequences as a LongTensor of shape (n, ctx); advances the cursor."""
        if n < 1:
            raise ValueError(f"batch size must be positive, got {n}")
        parts = []
        remaining = n
        while remaining:
            order = self.epoch_order(self.epoch)
            taken = order[self.position : self.position + remaining]
            parts.append(taken)
            self.position += len(taken)
            remaining -= len(taken)
            if self.position == self.n_sequences:
                self.epoch, self.position = self.epoch + 1, 0
        return self._gather(np.concatenate(parts))

    def iter_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """One pass over all sequences in epoch-0 order (stream order when ``shuffle=False``), in
        (batch_size, ctx) batches; the last incomplete batch is dropped. Does not move the cursor."""
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        order = self.epoch_order(0)
        for start in range(0, self.n_sequences - batch_size + 1, batch_size):
            yield self._gather(order[start : start + batch_size])

    def state_dict(self) -> dict[str, int]:
        """The cursor plus what identifies the data, all ints (JSON-serializable)."""
        return {
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "epoch": self.epoch,
            "position": self.position,
            "ctx": self.ctx,
            "n_sequences": self.n_sequences,
            "data_id": self.cache.data_id,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from ``state_dict()``; refuses a state taken on other data or another ``ctx``."""
        for name, mine in (
            ("ctx", self.ctx),
            ("n_sequences", self.n_sequences),
            ("data_id", self.cache.data_id),
        ):
            if int(state[name]) != mine:
                raise ValueError(
                    f"sampler state is for {name}={state[name]}, this sampler has {name}={mine}; "
                    "resume with the same token cache and ctx"
                )
        position = int(state["position"])
        if not 0 <= position < self.n_sequences:
            raise ValueError(f"sampler state position {position} out of range [0, {self.n_sequences})")
        # The saved seed/shuffle win: the point of resuming is to continue the saved run's order.
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        self.position = position
        self._order_cache = None

    def _gather(self, indices: np.ndarray) -> torch.Tensor:
        import torch

        ctx = self.ctx
        tokens = self.cache.tokens
        # Contiguous slices (one memcpy each) beat fancy indexing into the memmap for long sequences.
        batch = np.stack([tokens[i * ctx : (i + 1) * ctx] for i in indices.tolist()]).astype(np.int64)
        return torch.from_numpy(batch)


__all__: list[str] = [
    "DataSourceError",
    "FileDocuments",
    "HubSpec",
    "SequenceSampler",
    "TokenCache",
    "TokenCacheMismatchError",
    "build_token_cache",
    "default_cache_root",
    "hub_spec",
    "iter_documents",
    "hub_aliases",
    "list_source_files",
    "read_file_documents",
    "split_of",
    "stdlib_root",
]
