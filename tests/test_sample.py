"""Sampled token caches (lnfree.data.cache): a run tokenizes a seeded random sample of documents that covers what
it reads; the sample is distributed like the whole split; the cache grows without changing what earlier runs read;
resume stays exact across a growth."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lnfree.cli import main
from lnfree.data import SequenceSampler, build_token_cache
from lnfree.tokenizer import train_bpe_tokenizer
from test_train import RUN_ARGS, _losses

TOPICS = ["alpha beta gamma delta", "layer norm residual stream", "token cache python data model",
          "the quick brown fox jumps", "über 日本 naïve café"]


@pytest.fixture(scope="module")
def sorted_corpus(tmp_path_factory):
    """2,000 .jsonl documents of five topics, stored topic by topic and shortest first within a topic: a prefix of
    the file is one topic's short documents, so only a random sample of documents looks like the whole."""
    root = tmp_path_factory.mktemp("sampled")
    rng = random.Random(0)
    docs = []
    for topic in TOPICS:
        words = topic.split()
        docs += sorted((" ".join(rng.choice(words) for _ in range(rng.randint(5, 400))) for _ in range(400)), key=len)
    (root / "data").mkdir()
    (root / "data" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = train_bpe_tokenizer(docs[::10], 300, root / "tok")
    return root, tok


def _stats(tokens: np.ndarray, eot: int, vocab: int) -> tuple[float, np.ndarray]:
    """(tokens per document, unigram distribution)."""
    return len(tokens) / max(1, int((tokens == eot).sum())), np.bincount(tokens, minlength=vocab) / len(tokens)


def test_a_sample_is_distributed_like_the_whole_split(sorted_corpus, tmp_path):
    root, tok = sorted_corpus
    source = str(root / "data")
    full = build_token_cache(source, tok, split="all", cache_root=tmp_path, progress=False)
    need = full.token_count // 4
    sample = build_token_cache(source, tok, split="all", cache_root=tmp_path, progress=False, need_tokens=need)
    assert need <= sample.token_count < need + 2000  # at most one document beyond the need
    whole = np.asarray(full.tokens, dtype=np.int64)
    part = np.asarray(sample.tokens, dtype=np.int64)
    (length, unigram), (s_length, s_unigram) = _stats(whole, tok.eos_token_id, len(tok)), \
        _stats(part, tok.eos_token_id, len(tok))
    prefix = whole[:need]
    p_length, p_unigram = _stats(prefix, tok.eos_token_id, len(tok))
    # seeds 0-9 of the sample: within 5% and 0.041; the prefix: 0.52 and 0.51
    assert abs(s_length / length - 1) < 0.12 and abs(p_length / length - 1) > 0.3
    assert 0.5 * np.abs(s_unigram - unigram).sum() < 0.08 < 0.5 * np.abs(p_unigram - unigram).sum()
    # the sequences a run draws from its window carry documents of the whole split's length
    window = SequenceSampler(sample, 64, seed=1, window=sample.token_count // 64)
    drawn = window.next_batch(window.n_sequences).numpy()
    per_sequence = (drawn == tok.eos_token_id).mean() * length
    assert abs(per_sequence - 1) < 0.15
    # every sampled document is a whole document of the split, each once
    split_docs = lambda t: [d.tobytes() for d in np.split(t, np.flatnonzero(t == tok.eos_token_id) + 1) if d.size]
    sampled = split_docs(part)
    assert set(sampled) <= set(split_docs(whole)) and len(set(sampled)) == len(sampled)
    assert sample.manifest["sample"]["documents"] == len(sampled)


def test_the_cache_grows_without_changing_what_earlier_runs_read(sorted_corpus, tmp_path):
    root, tok = sorted_corpus
    source = str(root / "data")
    small = build_token_cache(source, tok, split="all", cache_root=tmp_path / "c", progress=False, need_tokens=5000)
    first = np.asarray(small.tokens).copy()
    before = SequenceSampler(small, 32, seed=3, window=5000 // 32)
    batches, state = [before.next_batch(4) for _ in range(5)], before.state_dict()
    grown = build_token_cache(source, tok, split="all", cache_root=tmp_path / "c", progress=False, need_tokens=40_000)
    assert grown.path == small.path and grown.token_count >= 40_000
    assert np.array_equal(np.asarray(grown.tokens)[: len(first)], first)  # appended, never rewritten
    after = SequenceSampler(grown, 32, seed=3, window=5000 // 32)
    assert [after.next_batch(4).tolist() for _ in range(5)] == [b.tolist() for b in batches]
    resumed = SequenceSampler(grown, 32, seed=3, window=5000 // 32)
    resumed.load_state_dict(state)  # a run's sampler state still fits its window of the grown cache
    assert resumed.next_batch(4).tolist() == after.next_batch(4).tolist()
    # what a cache holds at N tokens does not depend on its history
    direct = build_token_cache(source, tok, split="all", cache_root=tmp_path / "d", progress=False,
                               need_tokens=40_000)
    assert np.array_equal(np.asarray(direct.tokens), np.asarray(grown.tokens))
    # a smaller need reuses it as it is
    stamp = (grown.path / "tokens.bin").stat().st_mtime_ns
    again = build_token_cache(source, tok, split="all", cache_root=tmp_path / "c", progress=False, need_tokens=100)
    assert again.token_count == grown.token_count and (grown.path / "tokens.bin").stat().st_mtime_ns == stamp
    # a need beyond the split takes it all, once
    everything = build_token_cache(source, tok, split="all", cache_root=tmp_path / "c", progress=False,
                                   need_tokens=10**9)
    assert everything.manifest["sample"]["exhausted"] and everything.manifest["sample"]["documents"] == 2000


def test_a_run_tokenizes_only_its_need_and_resumes_exactly_after_another_run_grew_it(tiny_setup, tmp_path,
                                                                                  monkeypatch):
    import lnfree.run.train

    def run(out, *extra):
        return main(["remove", str(tiny_setup["model"]), "--data", str(tiny_setup["corpus"]), "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache"), *RUN_ARGS, *extra])

    assert run(tmp_path / "ref", "--sample-factor", "1") == 0
    (cache,) = [p for p in (tmp_path / "cache").iterdir() if "sample" in p.name]
    manifest = json.loads((cache / "manifest.json").read_text())
    need = 12 * 4 * 32  # steps × batch tokens (calibration re-reads them)
    assert need <= manifest["token_count"] and manifest["sample"]["units_read"] < manifest["sample"]["n_units"]
    # a run killed after its step-6 checkpoint ...
    real_save = lnfree.run.train.save_checkpoint

    def save_then_die(run_dir, model, optimizer, state, keep, world):
        path = real_save(run_dir, model, optimizer, state, keep=keep, world=world)
        if state.step == 6:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(lnfree.run.train, "save_checkpoint", save_then_die)
    assert run(tmp_path / "killed", "--sample-factor", "1") == 130
    monkeypatch.undo()
    # ... another run grows the shared cache ...
    assert run(tmp_path / "bigger", "--max-train-tokens", "40000") == 0
    assert json.loads((cache / "manifest.json").read_text())["token_count"] > manifest["token_count"]
    # ... and the resume still reads exactly what the uninterrupted run read
    assert run(tmp_path / "killed", "--resume", "--sample-factor", "1") == 0
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "ref")
    assert _losses(tmp_path / "bigger") != _losses(tmp_path / "ref")


def test_a_run_reads_its_sequences_from_a_sample_several_times_larger(sorted_corpus, tiny_setup, tmp_path):
    """The sample covers --sample-factor × what the run reads, and the run draws its sequences from all of it: from
    about that many times more documents than a sample of the run's own size."""
    documents, window, tokens = {}, {}, {}
    for factor in (1, 4):
        out, cache = tmp_path / f"run{factor}", tmp_path / f"cache{factor}"
        assert main(["remove", str(tiny_setup["model"]), "--data", str(sorted_corpus[0] / "data"), "--out",
                     str(out), "--cache-dir", str(cache), *RUN_ARGS, "--sample-factor", str(factor)]) == 0
        window[factor] = json.loads((out / "run.json").read_text())["data_window_sequences"]
        (folder,) = [p for p in cache.iterdir() if "sample" in p.name]
        manifest = json.loads((folder / "manifest.json").read_text())
        documents[factor], tokens[factor] = manifest["sample"]["documents"], manifest["token_count"]
    assert window == {1: 12 * 4, 4: 4 * 12 * 4}  # sequences of 32 tokens: steps × batch, and 4× that
    assert tokens[1] >= 12 * 4 * 32 and tokens[4] >= 4 * 12 * 4 * 32
    assert documents[4] > documents[1] > 0
