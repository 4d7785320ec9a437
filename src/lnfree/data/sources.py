"""Where documents come from: ``stdlib``, local files and folders, hub datasets, existing token caches.

Hub datasets are ``datasets`` datasets (streamed where they are too large to download), loaded offline at once
when the hub is unreachable. Local files are read here because the protocol is defined on them (one document per
text file or .jsonl/.parquet row; empty, binary and non-UTF-8 files skipped and counted; train/val by a hash of the
path), and because a sampled cache reads only the files it samples, where ``load_dataset("text")`` would first copy
the whole folder into the HF cache under its own decoding rules. Either way a source ends up as rows of text that
``writer.py`` tokenizes. See ``lnfree.data`` for the protocol.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import sysconfig
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lnfree.tokenizer import _first_line

VAL_FRACTION, SPLITS = 0.03, ("train", "val", "all")
TEXT_SUFFIXES, ROW_SUFFIXES = (".txt", ".py", ".md"), (".jsonl", ".parquet")
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# The token cache's file names, here because an existing cache folder is itself a valid source.
TOKENS_FILE, MANIFEST_FILE = "tokens.bin", "manifest.json"
# nanoGPT's openwebtext split, used by both papers: val is 0.05% of the hub "train" split.
OPENWEBTEXT_VAL_FRACTION, OPENWEBTEXT_SPLIT_SEED = 0.0005, 2357
_OFFLINE_HINT = "offline sources that work: 'stdlib' or a local file/folder of .txt/.py/.md/.jsonl/.parquet"


class DataSourceError(RuntimeError):
    """A data source cannot be resolved or read; the message is one line that says what to do."""


def split_of(relative_path: str) -> str:
    """``"val"`` for ~3% of paths, else ``"train"``, decided only by the path relative to its source root: hashing
    the path (not shuffling a list) keeps a file in its split when other files are added or removed."""
    bucket = int.from_bytes(hashlib.sha1(relative_path.encode("utf-8")).digest()[:4], "big") / 2**32
    return "val" if bucket < VAL_FRACTION else "train"


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder (the base interpreter's, also inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def list_source_files(source: str, split: str = "all") -> list[Path]:
    """Files of a local source (``"stdlib"``, a folder or a file) in ``split``, sorted for determinism."""
    return _local_files(source, split)[2]


def _local_files(source: str, split: str) -> tuple[Path, list[Path], list[Path]]:
    """(root, every candidate file, the files in ``split``) of ``stdlib`` or an existing local path."""
    path = stdlib_root() if source == "stdlib" else Path(source).expanduser().resolve()
    if source == "stdlib":
        root, files = path, _walk_files(path, (".py",), STDLIB_EXCLUDED_DIRS)
    elif path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES + ROW_SUFFIXES:
            raise DataSourceError(f"unsupported file type {path.suffix!r} for {path}; use .txt/.py/.md/.jsonl/.parquet")
        root, files = path.parent, [path]
    elif path.is_dir():
        root, files = path, _walk_files(path, TEXT_SUFFIXES + ROW_SUFFIXES, frozenset({"__pycache__"}))
    else:
        raise DataSourceError(f"no local file or folder {source!r}")
    if split not in SPLITS:
        raise DataSourceError(f"unknown split {split!r} for local source {source!r}; use one of {SPLITS}")
    if source != "stdlib" and path.is_file():  # one file cannot be split by file
        if split == "val":
            raise DataSourceError(f"{source!r} is a single file, which cannot be split by file; pass a separate "
                                  "val file (as split='all') or a folder")
        return root, files, files
    return root, files, [p for p in files if split == "all" or split_of(p.relative_to(root).as_posix()) == split]


def _walk_files(root: Path, suffixes: tuple[str, ...], excluded_dirs: frozenset[str]) -> list[Path]:
    """Matching files under ``root``, skipping hidden entries (.git, editor backups) and excluded folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in excluded_dirs]
        found += [Path(dirpath, n) for n in filenames if not n.startswith(".") and n.lower().endswith(suffixes)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


@dataclass
class FileDocuments:
    """The documents of one file; ``skip_reason`` is set (and no documents) when the file is unusable."""

    path: Path
    documents: list[str] = field(default_factory=list)
    skip_reason: str | None = None
    empty_documents: int = 0  # empty rows inside a .jsonl/.parquet file


def read_file_documents(path: Path) -> FileDocuments:
    """Read one source file: whole-file text for .txt/.py/.md, one document per row for .jsonl/.parquet."""
    path, result = Path(path), FileDocuments(Path(path))
    if path.suffix.lower() == ".parquet":
        rows, result.skip_reason = _parquet_rows(path)
    else:
        text, result.skip_reason = _decode(path.read_bytes())
        rows = _jsonl_rows(path, text) if path.suffix.lower() == ".jsonl" else iter([(str(path), text)])
    for where, value in rows if result.skip_reason is None else ():
        if not isinstance(value, str | None):
            raise DataSourceError(f"{where}: 'text' must be a string, got {type(value).__name__}")
        if value:
            result.documents.append(value)
        else:
            result.empty_documents += 1
    if result.skip_reason is None and not result.documents:
        result.skip_reason = "no non-empty 'text' rows"
    return result


def _decode(raw: bytes) -> tuple[str, str | None]:
    """(text, None) for usable UTF-8 text, else ("", why the file is skipped)."""
    if not raw.strip():
        return "", "empty"
    if b"\x00" in raw:  # UTF-8 text never contains NUL; this catches binaries and UTF-16 files
        return "", "binary (NUL bytes)"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return "", "not UTF-8"
    return (text, None) if text.strip() else ("", "empty")


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    # split("\n"), not splitlines(): JSON strings may legally contain U+2028 and other line separators.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataSourceError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
            if not isinstance(row, dict) or "text" not in row:
                raise DataSourceError(f"{path}:{lineno}: each .jsonl line must be an object with a 'text' field")
            yield f"{path}:{lineno}", row["text"]


def _parquet_rows(path: Path) -> tuple[Iterator[tuple[str, Any]], str | None]:
    import pyarrow.parquet as pq  # a dependency of datasets

    try:
        names = pq.read_schema(path).names if path.stat().st_size else None
    except Exception:  # noqa: BLE001 - any parse failure means "not parquet": skip and count it
        return iter(()), "not a readable parquet file"
    if names is None:
        return iter(()), "empty"
    if "text" not in names:
        raise DataSourceError(f"{path}: parquet file has no 'text' column (columns: {names})")
    values = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return ((f"{path}: row {i}", value) for i, value in enumerate(values)), None


# ------------------------------------------------------------------------------------------------ hub datasets


@dataclass(frozen=True)
class HubSpec:
    """How to read one hub dataset. ``splits`` maps an lnfree split to hub splits tried in order."""

    repo: str
    splits: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"train": ("train",), "val": ("validation", "val", "test")})
    streaming: bool = False
    carve_val_from_train: bool = False  # openwebtext only has "train"; val is carved out like nanoGPT
    expected_vocab: int | None = None  # pre-tokenized data: the vocabulary size its ids come from
    passthrough_splits: bool = False  # unknown split names (e.g. "train[:1%]") go to the hub unchanged
    prefer_ids: bool = False  # score the stored token ids rather than re-tokenising the text, when both exist


_OPENWEBTEXT = HubSpec("Skylion007/openwebtext", carve_val_from_train=True)
_PILE = HubSpec("monology/pile-uncopyrighted", streaming=True)
_APOLLO_PILE_GPT2 = HubSpec("apollo-research/monology-pile-uncopyrighted-tokenizer-gpt2", streaming=True,
                            expected_vocab=50257)
# Baroni et al.'s evaluation set (first 10k rows): all of it is evaluation data, so only "val" reads it, from a
# validation/test split if the hub has one, else from its "train" split. Their `pile_eval.py` scores its stored
# GPT-2 `input_ids` (concatenated as stored, then chunked), so we do too when the column is there.
_PILE_FILTERED = HubSpec("lucabaroni/apollo-pile-filtered-10k", splits={"val": ("validation", "test", "train")},
                         expected_vocab=50257, prefer_ids=True)
HUB_ALIASES: dict[str, HubSpec] = {"openwebtext": _OPENWEBTEXT, "pile": _PILE, "pile-filtered": _PILE_FILTERED,
                                   **{s.repo: s for s in (_OPENWEBTEXT, _PILE, _APOLLO_PILE_GPT2, _PILE_FILTERED)}}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_reachable() -> bool:
    """One TCP connect to the hub endpoint: without it, datasets retries an unreachable hub for ~30 s."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides reachability; let datasets try
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=3.0):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline(on: bool) -> Iterator[None]:
    """Force datasets and huggingface_hub offline for one load: both read HF_HUB_OFFLINE once, at import, so when
    it is set later (tests, notebooks) or the hub is unreachable, their module flags are flipped instead."""
    from datasets import config
    from huggingface_hub import constants

    names = ((config, "HF_HUB_OFFLINE"), (config, "HF_DATASETS_OFFLINE"), (constants, "HF_HUB_OFFLINE"))
    saved = [(module, name, getattr(module, name)) for module, name in names if on and hasattr(module, name)]
    for module, name, _ in saved:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _load_hub_dataset(spec: HubSpec, split: str, num_proc: int) -> Any:
    """The hub dataset (a ``Dataset`` or streaming ``IterableDataset``) for an lnfree split."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(n, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for n in names):
        offline_reason = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    else:
        offline_reason = None if _hub_reachable() else "the hub is unreachable"
    try:
        with _offline(offline_reason is not None):
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
        parts = load("train").train_test_split(test_size=OPENWEBTEXT_VAL_FRACTION, seed=OPENWEBTEXT_SPLIT_SEED)
        return parts["test" if split == "val" else "train"]
    candidates = spec.splits.get(split) or ((split,) if spec.passthrough_splits else ())
    if not candidates:
        raise DataSourceError(f"{spec.repo!r} has no lnfree split {split!r}; use one of {sorted(spec.splits)}")
    for hub_split in candidates[:-1]:
        with contextlib.suppress(ValueError):  # datasets' error for an unknown split name: try the next one
            return load(hub_split)
    return load(candidates[-1])


def _hub_column(dataset: Any, spec: HubSpec) -> str:
    """``text`` for raw text, ``input_ids`` for pre-tokenized data."""
    columns = dataset.column_names
    if columns is None:  # some streaming datasets only know their columns after the first row
        columns = list(next(iter(dataset)).keys())
    for column in ("input_ids", "text") if spec.prefer_ids else ("text", "input_ids"):
        if column in columns:
            return column
    raise DataSourceError(f"hub dataset {spec.repo!r} has neither a 'text' nor an 'input_ids' column: {columns}")


# ------------------------------------------------------------------------------------------------ any source


@dataclass(frozen=True)
class _Source:
    """A resolved source. ``kind`` is "files", "hub" or "cache"."""

    kind: str
    ident: str  # what the cache key records: "stdlib", an absolute path or a hub repo
    slug: str  # readable prefix of the cache folder name
    root: Path | None = None
    files: tuple[Path, ...] = ()
    hub: HubSpec | None = None
    signature: str | None = None  # (path, size, mtime) of local inputs: an edited folder never reuses a cache


def _resolve_source(source: str, split: str) -> _Source:
    """Decide what ``source`` names: ``stdlib``, a local path (cache folder or data), else a hub dataset."""
    local = Path(source).expanduser()
    if source != "stdlib" and local.is_dir() and (local / MANIFEST_FILE).is_file() and (local / TOKENS_FILE).exists():
        return _Source("cache", str(local.resolve()), _slug(local.name), root=local.resolve())
    if source == "stdlib" or local.exists():
        root, files, selected = _local_files(source, split)
        if not selected:
            raise DataSourceError(
                f"no .txt/.py/.md/.jsonl/.parquet files in split {split!r} of {source!r} ({len(files)} files in "
                f"all; ~{VAL_FRACTION:.0%} of files go to val by path hash); use split='all' or more files")
        digest = hashlib.sha256()
        for path in selected:
            stat = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        ident = "stdlib" if source == "stdlib" else str(local.resolve())
        return _Source("files", ident, _slug(Path(ident).name), root, tuple(selected), None, digest.hexdigest()[:16])
    spec = HUB_ALIASES.get(source) or (HubSpec(source, passthrough_splits=True) if _HUB_NAME.match(source) else None)
    if spec is None:
        raise DataSourceError(f"unknown data source {source!r}: not 'stdlib', not an existing local file/folder, and "
                              f"not a hub name ({', '.join(n for n in HUB_ALIASES if '/' not in n)} or owner/name)")
    return _Source("hub", spec.repo, _slug(spec.repo.replace("/", "--")), hub=spec)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:48] or "source"


def _rows(resolved: _Source, split: str, num_proc: int) -> tuple[str, Iterator[Any]]:
    """The source's rows in stream order: ("text", (text, why a file was skipped or None)) or ("input_ids", ids).
    A hub dataset is opened before this returns, so an unreadable one fails before anything is written."""
    if resolved.kind == "files":
        return "text", _file_rows(resolved)
    dataset = _load_hub_dataset(resolved.hub, split, num_proc)
    column = _hub_column(dataset, resolved.hub)
    rows = (row for batch in dataset.select_columns([column]).iter(batch_size=1000) for row in batch[column])
    return column, ((text, None) for text in rows) if column == "text" else rows


def _file_rows(resolved: _Source) -> Iterator[tuple[str, str | None]]:
    for path in resolved.files:
        docs = read_file_documents(path)
        if docs.skip_reason is not None:
            yield "", f"{path.relative_to(resolved.root).as_posix()} ({docs.skip_reason})"
        else:
            yield from ((text, None) for text in docs.documents + [""] * docs.empty_documents)


def _indexed(resolved: _Source, split: str, num_proc: int) -> tuple[int, Callable] | None:
    """(number of documents, texts at given indices) for random access — each text file one document, each
    .jsonl/.parquet row one, a hub dataset's rows — or None when there is none (streaming or pre-tokenized data)."""
    if resolved.kind == "hub":
        dataset = _load_hub_dataset(resolved.hub, split, num_proc)
        if not hasattr(dataset, "__len__") or _hub_column(dataset, resolved.hub) != "text":
            return None
        dataset = dataset.select_columns(["text"])
        return len(dataset), lambda indices: [t or "" for t in dataset[indices.tolist()]["text"]]
    units: list[tuple[int, int]] = []  # (file, row), row -1 for a one-document text file read when drawn
    rows: dict[int, list[str]] = {}  # row files, parsed once
    for f, path in enumerate(resolved.files):
        if path.suffix.lower() in ROW_SUFFIXES:
            rows[f] = read_file_documents(path).documents
            units += [(f, r) for r in range(len(rows[f]))]
        else:
            units.append((f, -1))

    def text(f: int, r: int) -> str:
        return rows[f][r] if r >= 0 else (read_file_documents(resolved.files[f]).documents or [""])[0]

    return len(units), lambda indices: [text(*units[i]) for i in indices.tolist()]
