"""Tests for lnfree.tokenizer and lnfree.data: tokenizer training, token caches, splits and sampling.

Everything runs offline on CPU with a tiny BPE tokenizer trained in a temp folder.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lnfree import data
from lnfree.data import (
    DataSourceError,
    SequenceSampler,
    TokenCache,
    TokenCacheMismatchError,
    build_token_cache,
    list_source_files,
    read_file_documents,
    stdlib_root,
)
from lnfree.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

WORDS = "alpha beta gamma delta layer norm residual stream token cache python data model über 日本".split()
TRAIN_TEXTS = [
    "def forward(self, x):\n    return self.ln(x) + x\n",
    "The residual stream of a transformer carries every layer's output.\n" * 3,
    " ".join(WORDS) * 4,
    "LayerNorm removal: fine-tune, then freeze the scale.\n",
]


def make_doc(i: int) -> str:
    rng = random.Random(i)
    return f"Document {i}.\n" + " ".join(rng.choice(WORDS) for _ in range(5 + i % 17)) + "\n"


def direct_tokens(tok, docs: list[str]) -> np.ndarray:
    """The protocol spelled out: each document's ids (special-token text stays text), then EOT."""
    ids: list[int] = []
    for doc in docs:
        ids += tok(doc, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids.append(tok.eos_token_id)
    return np.array(ids, dtype=np.int64)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe_tokenizer(TRAIN_TEXTS, 320, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def other_tok(tmp_path_factory):
    return train_bpe_tokenizer(TRAIN_TEXTS, 290, tmp_path_factory.mktemp("other_tok"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """200 small .txt files in two subfolders; returns (folder, documents in sorted-path order)."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(200):
        path = root / ("a" if i % 2 else "b") / f"doc{i:03d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(make_doc(i), encoding="utf-8")
    files = list_source_files(str(root), "all")
    return root, [f.read_text(encoding="utf-8") for f in files]


@pytest.fixture()
def mixed(tmp_path) -> tuple[Path, list[str]]:
    """One file of each supported format; returns (folder, documents in cache order)."""
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("plain text document\n", encoding="utf-8")
    (root / "b.md").write_text("# Heading\n\nliteral <|endoftext|> stays text\n", encoding="utf-8")
    (root / "c.py").write_text("print('hi')\n", encoding="utf-8")
    rows = [{"text": "first row"}, {"text": ""}, {"text": "second row\u2028with a line separator"}]
    (root / "sub" / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    docs = [
        "plain text document\n",
        "# Heading\n\nliteral <|endoftext|> stays text\n",
        "print('hi')\n",
        "first row",
        "second row\u2028with a line separator",
    ]
    return root, docs


# ---------------------------------------------------------------------------------------------- tokenizer


def test_trained_tokenizer_reloads_with_autotokenizer_and_round_trips(tok, tmp_path):
    reloaded = AutoTokenizer.from_pretrained(tok.name_or_path)
    assert reloaded.eos_token == reloaded.bos_token == reloaded.unk_token == "<|endoftext|>"
    assert len(reloaded) <= 320
    for text in [*TRAIN_TEXTS, "  unseen  words\t\n\n über 🎉 ", "x"]:
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        assert reloaded.decode(ids) == text
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tok)
    # Deterministic: the same input trains the same tokenizer.
    again = train_bpe_tokenizer(TRAIN_TEXTS, 320, tmp_path / "again")
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_training_from_file_paths_skips_unusable_files(tmp_path):
    good = [tmp_path / "a.txt", tmp_path / "b.py"]
    for path, text in zip(good, TRAIN_TEXTS[:2], strict=True):
        path.write_text(text, encoding="utf-8")
    binary = tmp_path / "c.txt"
    binary.write_bytes(b"\x00\x01binary")
    from_files = train_bpe_tokenizer([*good, binary], 300, tmp_path / "from_files")
    from_texts = train_bpe_tokenizer(TRAIN_TEXTS[:2], 300, tmp_path / "from_texts")
    assert tokenizer_fingerprint(from_files) == tokenizer_fingerprint(from_texts)


def test_fingerprint_separates_tokenizers_but_ignores_call_state(tok, other_tok):
    before = tokenizer_fingerprint(tok)
    tok("some text to truncate", truncation=True, max_length=2)
    assert tokenizer_fingerprint(tok) == before
    assert len(before) == 16 and tokenizer_fingerprint(other_tok) != before


def test_load_tokenizer_failure_is_one_line(tmp_path):
    missing = tmp_path / "no-tokenizer-here"
    missing.mkdir()
    with pytest.raises(ValueError) as err:
        load_tokenizer(missing)
    message = str(err.value)
    assert "\n" not in message and str(missing) in message and "no tokenizer in" in message


# ---------------------------------------------------------------------------------------------- token cache


def test_cache_equals_direct_tokenization_with_eot_after_each_document(tok, mixed, tmp_path):
    root, docs = mixed
    cache = build_token_cache(str(root), tok, split="all", cache_root=tmp_path / "c", num_proc=1, progress=False)
    expected = direct_tokens(tok, docs)
    np.testing.assert_array_equal(np.asarray(cache.tokens, dtype=np.int64), expected)
    manifest = cache.manifest
    assert manifest["n_documents"] == len(docs)
    assert manifest["empty_documents"] == 1  # the empty jsonl row
    # One EOT per document and none elsewhere, even though one document spells "<|endoftext|>" out.
    assert int((np.asarray(cache.tokens) == tok.eos_token_id).sum()) == len(docs)
    assert manifest["eot_id"] == tok.eos_token_id
    assert manifest["token_count"] == len(expected) == cache.tokens.shape[0]
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert manifest["dtype"] == "uint16" and cache.tokens.dtype.itemsize == 2
    assert (cache.path / "tokens.bin").stat().st_size == 2 * len(expected)


def test_build_is_byte_identical_across_num_proc(tok, corpus, tmp_path):
    root, docs = corpus
    single = build_token_cache(str(root), tok, "all", cache_root=tmp_path / "p1", num_proc=1, progress=False)
    multi = build_token_cache(str(root), tok, "all", cache_root=tmp_path / "p2", num_proc=2, progress=False)
    assert (single.path / "tokens.bin").read_bytes() == (multi.path / "tokens.bin").read_bytes()
    np.testing.assert_array_equal(np.asarray(single.tokens, dtype=np.int64), direct_tokens(tok, docs))


def test_limits_keep_a_prefix_of_the_stream(tok, corpus, tmp_path):
    root, docs = corpus
    full = np.asarray(build_token_cache(str(root), tok, "all", cache_root=tmp_path, num_proc=1, progress=False).tokens)
    by_docs = build_token_cache(str(root), tok, "all", cache_root=tmp_path, max_documents=5, progress=False)
    np.testing.assert_array_equal(np.asarray(by_docs.tokens, dtype=np.int64), direct_tokens(tok, docs[:5]))
    assert by_docs.manifest["n_documents"] == 5
    n = len(full) // 3
    by_tokens = build_token_cache(str(root), tok, "all", cache_root=tmp_path, max_tokens=n, progress=False)
    np.testing.assert_array_equal(np.asarray(by_tokens.tokens), full[:n])
    assert len({full.size, by_docs.token_count, by_tokens.token_count}) == 3  # three distinct caches


def test_cache_is_reused_and_other_tokenizer_is_refused(tok, other_tok, mixed, tmp_path, monkeypatch):
    root, _ = mixed
    first = build_token_cache(str(root), tok, "all", cache_root=tmp_path, num_proc=1, progress=False)
    saved = np.array(first.tokens)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a valid cache must be reused, not rebuilt")

    monkeypatch.setattr(data.cache, "_build", no_rebuild)
    again = build_token_cache(str(root), tok, "all", cache_root=tmp_path, num_proc=1, progress=False)
    assert again.path == first.path
    np.testing.assert_array_equal(np.asarray(again.tokens), saved)

    fp_cache, fp_other = tokenizer_fingerprint(tok), tokenizer_fingerprint(other_tok)
    for reuse in (
        lambda: build_token_cache(str(first.path), other_tok, "all", cache_root=tmp_path),
        lambda: TokenCache.open(first.path, tokenizer=other_tok),
    ):
        with pytest.raises(TokenCacheMismatchError) as err:
            reuse()
        message = str(err.value)
        assert fp_cache in message and fp_other in message and "\n" not in message
    # The matching tokenizer may reuse the folder directly.
    direct = build_token_cache(str(first.path), tok, "all")
    np.testing.assert_array_equal(np.asarray(direct.tokens), saved)


def test_interrupted_build_never_looks_complete(tok, mixed, tmp_path, monkeypatch):
    root, docs = mixed

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # dies after tokens.bin is in place, before the manifest

    monkeypatch.setattr(data.cache, "atomic_write", killed)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(str(root), tok, "all", cache_root=tmp_path / "c", num_proc=1, progress=False)
    (folder,) = list((tmp_path / "c").iterdir())
    assert not (folder / "manifest.json").exists()
    with pytest.raises(DataSourceError):
        TokenCache.open(folder, tok)

    monkeypatch.undo()

    def crash_midway(*args, **kwargs):
        raise RuntimeError("tokenizer died")

    monkeypatch.setattr(data.writer, "_encode", crash_midway)
    with pytest.raises(RuntimeError):
        build_token_cache(str(root), tok, "all", cache_root=tmp_path / "c", num_proc=1, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["tokens.bin"]  # no temp files left behind

    monkeypatch.undo()
    cache = build_token_cache(str(root), tok, "all", cache_root=tmp_path / "c", num_proc=1, progress=False)
    assert cache.path == folder
    np.testing.assert_array_equal(np.asarray(cache.tokens, dtype=np.int64), direct_tokens(tok, docs))


def test_a_same_size_corrupt_cache_is_rebuilt_or_refused(tok, mixed, tmp_path, monkeypatch):
    """Bytes changed in place (same size, so the size check passes): a small cache fails its sha256 and is rebuilt;
    a large one (hash not checked at open) is refused in one line as soon as a batch holds an impossible id."""
    root, docs = mixed
    cache = build_token_cache(str(root), tok, "all", cache_root=tmp_path / "c", num_proc=1, progress=False)
    path = cache.path / "tokens.bin"
    good = path.read_bytes()
    corrupt = np.frombuffer(good, dtype=cache.tokens.dtype).copy()
    corrupt[5] = (int(corrupt[5]) + 1) % len(tok)  # an in-range id: only the hash can tell
    path.write_bytes(corrupt.tobytes())
    rebuilt = build_token_cache(str(root), tok, "all", cache_root=tmp_path / "c", num_proc=1, progress=False)
    assert path.read_bytes() == good
    np.testing.assert_array_equal(np.asarray(rebuilt.tokens, dtype=np.int64), direct_tokens(tok, docs))

    corrupt[5] = np.iinfo(corrupt.dtype).max  # an id no embedding has
    path.write_bytes(corrupt.tobytes())
    monkeypatch.setattr(data.cache, "VERIFY_HASH_BYTES", 0)  # as for a cache too large to hash at every open
    large = build_token_cache(str(root), tok, "all", cache_root=tmp_path / "c", num_proc=1, progress=False)
    with pytest.raises(DataSourceError, match="outside its .*vocabulary: the file is corrupt; delete the folder"):
        SequenceSampler(large, 8, shuffle=False).next_batch(4)


def test_empty_and_binary_files_are_skipped_and_counted(tok, tmp_path):
    root = tmp_path / "messy"
    root.mkdir()
    (root / "good.txt").write_text("the only usable document\n", encoding="utf-8")
    bad = {
        "empty.txt": b"",
        "blank.md": b"  \n\t\n",
        "nul.txt": b"text\x00with a NUL",
        "latin1.py": "caf\xe9 = 1\n".encode("latin-1"),
        "rows.jsonl": b'{"text": ""}\n',
    }
    for name, raw in bad.items():
        (root / name).write_bytes(raw)
    cache = build_token_cache(str(root), tok, "all", cache_root=tmp_path / "c", num_proc=1, progress=False)
    assert cache.manifest["n_documents"] == 1
    assert cache.manifest["skipped_files"] == len(bad)
    assert {entry.split(" ")[0] for entry in cache.manifest["skipped_examples"]} == set(bad)
    np.testing.assert_array_equal(
        np.asarray(cache.tokens, dtype=np.int64), direct_tokens(tok, ["the only usable document\n"])
    )

    (root / "good.txt").unlink()
    with pytest.raises(DataSourceError) as err:
        build_token_cache(str(root), tok, "all", cache_root=tmp_path / "c", num_proc=1, progress=False)
    assert f"{len(bad)} files skipped" in str(err.value) and "\n" not in str(err.value)


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"bad\.jsonl:2"):
        read_file_documents(path)


def test_stdlib_split_is_deterministic_and_disjoint_by_file():
    root = stdlib_root()
    everything = list_source_files("stdlib", "all")
    train, val = list_source_files("stdlib", "train"), list_source_files("stdlib", "val")
    assert list_source_files("stdlib", "val") == val  # deterministic
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(everything)
    assert all(p.suffix == ".py" for p in everything)
    relative = [p.relative_to(root).parts for p in everything]
    assert not any({"site-packages", "dist-packages"} & set(parts) for parts in relative)
    assert any("test" in parts for parts in relative)  # test folders are included
    assert 0.01 < len(val) / len(everything) < 0.06


def test_stdlib_source_builds_offline(tok, tmp_path):
    cache = build_token_cache("stdlib", tok, "val", cache_root=tmp_path, max_documents=3, progress=False)
    docs = [d for d in (read_file_documents(p).documents for p in list_source_files("stdlib", "val")) if d]
    np.testing.assert_array_equal(
        np.asarray(cache.tokens, dtype=np.int64), direct_tokens(tok, [d[0] for d in docs[:3]])
    )
    assert cache.manifest["split"] == "val" and cache.manifest["source"] == "stdlib"


def test_folder_split_partitions_documents(tok, corpus, tmp_path):
    root, docs = corpus
    kwargs = dict(cache_root=tmp_path, num_proc=1, progress=False)
    train = build_token_cache(str(root), tok, "train", **kwargs)
    val = build_token_cache(str(root), tok, "val", **kwargs)
    assert train.manifest["n_documents"] > val.manifest["n_documents"] > 0
    assert train.manifest["n_documents"] + val.manifest["n_documents"] == len(docs)
    assert train.path != val.path


# ---------------------------------------------------------------------------------------------- sources


def test_hub_source_offline_fails_fast_with_one_line(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for name, repo in [
        ("openwebtext", "Skylion007/openwebtext"),
        ("pile", "monology/pile-uncopyrighted"),
        ("nobody-xyz/no-such-dataset", "nobody-xyz/no-such-dataset"),
    ]:
        start = time.monotonic()
        with pytest.raises(DataSourceError) as err:
            build_token_cache(name, tok, "train", cache_root=tmp_path, progress=False)
        assert time.monotonic() - start < 15
        message = str(err.value)
        assert "\n" not in message and repo in message and "stdlib" in message
    assert not any(tmp_path.iterdir())  # nothing half-built


@pytest.fixture()
def fake_hub(monkeypatch):
    """Serve in-memory datasets through ``datasets.load_dataset`` so the hub code paths run offline."""
    import datasets

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(data.sources, "_hub_reachable", lambda: True)
    repos: dict[str, dict[str, dict]] = {}
    calls: list[tuple[str, str, bool]] = []

    def load_dataset(repo, split=None, streaming=False, num_proc=None):
        calls.append((repo, split, streaming))
        if split not in repos[repo]:
            raise ValueError(f"Unknown split {split!r}. Should be one of {list(repos[repo])}.")
        dataset = datasets.Dataset.from_dict(repos[repo][split])
        return dataset.to_iterable_dataset() if streaming else dataset

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return repos, calls


def test_openwebtext_val_is_the_papers_split(tok, fake_hub, tmp_path):
    import datasets

    repos, _ = fake_hub
    texts = [make_doc(i) for i in range(4000)]
    repos["Skylion007/openwebtext"] = {"train": {"text": texts}}
    reference = datasets.Dataset.from_dict({"text": texts}).train_test_split(test_size=0.0005, seed=2357)
    kwargs = dict(cache_root=tmp_path, progress=False)
    val = build_token_cache("openwebtext", tok, "val", num_proc=2, **kwargs)
    np.testing.assert_array_equal(np.asarray(val.tokens, dtype=np.int64), direct_tokens(tok, reference["test"]["text"]))
    train = build_token_cache("openwebtext", tok, "train", max_documents=30, num_proc=1, **kwargs)
    np.testing.assert_array_equal(
        np.asarray(train.tokens, dtype=np.int64), direct_tokens(tok, reference["train"]["text"][:30])
    )
    assert val.manifest["source_resolved"] == "Skylion007/openwebtext" and val.path != train.path


def test_hub_text_split_fallback_and_pretokenized_rows(tok, fake_hub, tmp_path):
    repos, calls = fake_hub
    repos["someone/texts"] = {"train": {"text": ["a", "b"]}, "test": {"text": ["held out", "", "rows"]}}
    val = build_token_cache("someone/texts", tok, "val", cache_root=tmp_path, progress=False)
    assert [c[1] for c in calls] == ["validation", "val", "test"]  # val falls back to the hub's test split
    np.testing.assert_array_equal(np.asarray(val.tokens), direct_tokens(tok, ["held out", "rows"]))
    assert val.manifest["empty_documents"] == 1

    pile_docs = [make_doc(i) for i in range(10)]
    repos["monology/pile-uncopyrighted"] = {"validation": {"text": pile_docs}}
    pile = build_token_cache("pile", tok, "val", cache_root=tmp_path, max_documents=4, progress=False)
    assert calls[-1] == ("monology/pile-uncopyrighted", "validation", True)  # streamed
    np.testing.assert_array_equal(np.asarray(pile.tokens), direct_tokens(tok, pile_docs[:4]))

    rows = [[5, 6, 7], [8, tok.eos_token_id, 9]]
    repos["someone/pretok"] = {"train": {"input_ids": rows}}
    pre = build_token_cache("someone/pretok", tok, "train", cache_root=tmp_path, progress=False)
    np.testing.assert_array_equal(np.asarray(pre.tokens), np.concatenate(rows))  # rows joined, no EOT added
    assert pre.manifest["pretokenized"] is True
    repos["someone/too-big"] = {"train": {"input_ids": [[1, len(tok) + 5]]}}
    with pytest.raises(DataSourceError, match="outside"):
        build_token_cache("someone/too-big", tok, "train", cache_root=tmp_path, progress=False)


def test_pile_filtered_scores_its_stored_ids_like_the_2025_code(tok, fake_hub, tmp_path, monkeypatch):
    """removing-layer-norm's pile_eval.py concatenates the dataset's stored GPT-2 `input_ids`; re-tokenising its
    `text` could give other ids. With both columns we read the ids; with text alone, the text."""
    from dataclasses import replace

    spec = data.sources.HUB_ALIASES["pile-filtered"]
    assert spec.prefer_ids and spec.expected_vocab == 50257
    monkeypatch.setitem(data.sources.HUB_ALIASES, "pile-filtered", replace(spec, expected_vocab=len(tok)))
    repos, _ = fake_hub
    rows = [[5, 6, 7, tok.eos_token_id], [8, 9, tok.eos_token_id]]
    texts = ["def f():", "return 1"]
    repos[spec.repo] = {"train": {"text": texts, "input_ids": rows}}
    cache = build_token_cache("pile-filtered", tok, "val", cache_root=tmp_path, progress=False)
    np.testing.assert_array_equal(np.asarray(cache.tokens), np.concatenate(rows))
    repos[spec.repo] = {"train": {"text": texts}}
    text_only = build_token_cache("pile-filtered", tok, "val", cache_root=tmp_path / "t", progress=False)
    np.testing.assert_array_equal(np.asarray(text_only.tokens), direct_tokens(tok, texts))


def test_unknown_source_and_split_are_rejected(tok, mixed, tmp_path):
    with pytest.raises(DataSourceError, match="unknown data source"):
        build_token_cache("not a source at all", tok, cache_root=tmp_path)
    with pytest.raises(DataSourceError, match="unknown split"):
        build_token_cache(str(mixed[0]), tok, split="dev", cache_root=tmp_path)


# ---------------------------------------------------------------------------------------------- sequences


@pytest.fixture()
def corpus_cache(tok, corpus, tmp_path) -> TokenCache:
    return build_token_cache(str(corpus[0]), tok, "all", cache_root=tmp_path, num_proc=1, progress=False)


def test_sequences_are_non_overlapping_slices_without_bos(corpus_cache):
    ctx = 7
    n = corpus_cache.n_sequences(ctx)
    assert n == corpus_cache.token_count // ctx and n > 0
    stream = np.asarray(corpus_cache.tokens, dtype=np.int64)
    pieces = np.concatenate([corpus_cache.sequence(i, ctx) for i in range(n)])
    np.testing.assert_array_equal(pieces, stream[: n * ctx])  # the incomplete tail is dropped
    with pytest.raises(IndexError):
        corpus_cache.sequence(n, ctx)


def test_sequential_iteration_is_in_order_and_keeps_the_last_batch(corpus_cache):
    ctx, batch_size = 16, 5
    sampler = SequenceSampler(corpus_cache, ctx, seed=0, shuffle=False)
    batches = list(sampler.iter_batches(batch_size))
    n = corpus_cache.n_sequences(ctx)
    assert n % batch_size and len(batches) == n // batch_size + 1
    assert all(b.shape == (batch_size, ctx) and b.dtype == torch.int64 for b in batches[:-1])
    assert batches[-1].shape == (n % batch_size, ctx)
    got = np.concatenate([b.numpy() for b in batches])
    expected = np.stack([corpus_cache.sequence(i, ctx) for i in range(n)])
    np.testing.assert_array_equal(got, expected)


def test_shuffled_epochs_are_permutations_that_depend_on_seed(corpus_cache):
    ctx = 16
    sampler = SequenceSampler(corpus_cache, ctx, seed=3)
    n = sampler.n_sequences
    first, second = sampler.epoch_order(0).copy(), sampler.epoch_order(1).copy()
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(n))
    assert first.tolist() != second.tolist()
    assert SequenceSampler(corpus_cache, ctx, seed=4).epoch_order(0).tolist() != first.tolist()
    one_epoch = np.concatenate([sampler.next_batch(1).numpy() for _ in range(n)])
    np.testing.assert_array_equal(one_epoch, np.stack([corpus_cache.sequence(i, ctx) for i in first]))
    assert sampler.state_dict()["epoch"] == 1


def test_sampler_resume_continues_with_the_same_batches(corpus_cache):
    ctx, batch, k, total = 128, 6, 7, 25  # runs across several epoch boundaries
    uninterrupted = SequenceSampler(corpus_cache, ctx, seed=11)
    expected = [uninterrupted.next_batch(batch) for _ in range(total)]
    assert uninterrupted.state_dict()["epoch"] >= 2

    first_run = SequenceSampler(corpus_cache, ctx, seed=11)
    for _ in range(k):
        first_run.next_batch(batch)
    state = json.loads(json.dumps(first_run.state_dict()))  # as stored in a checkpoint
    assert all(isinstance(v, int) for v in state.values())

    resumed = SequenceSampler(corpus_cache, ctx, seed=0)  # the saved seed wins
    resumed.load_state_dict(state)
    for i in range(k, total):
        assert resumed.next_batch(batch).equal(expected[i])

    with pytest.raises(ValueError, match="ctx"):
        SequenceSampler(corpus_cache, ctx * 2, seed=11).load_state_dict(state)
