"""Evaluation: the papers' CE protocol against `transformers`, published-convention models, statistics,
tables, bad input, the CLI, and lm-evaluation-harness on a local HellaSwag-format task."""

from __future__ import annotations

import json
import string
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_hf_gpt2
from lnfree.analysis.eval_data import check_compatible, load_eval_data
from lnfree.analysis.eval_suite import compare
from lnfree.analysis.evaluate import evaluate_ce, summarize_losses
from lnfree.analysis.tables import format_markdown, table_rows, with_table
from lnfree.data import SequenceSampler, build_token_cache
from lnfree.method.calibrate import calibrate
from lnfree.models import load_model

FIXTURES = Path(__file__).parent / "fixtures"
CTX, BATCH = 32, 4


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def corpus(workdir) -> Path:
    """A folder of small text documents (stdlib sources and the HellaSwag fixture): real, offline, stable."""
    folder = workdir / "corpus"
    folder.mkdir()
    texts = [Path(m.__file__).read_text() for m in (json, string, textwrap)]
    texts.append((FIXTURES / "hellaswag_local" / "hellaswag_mini.jsonl").read_text())
    for i, text in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(text[:12_000])
    return folder


@pytest.fixture(scope="module")
def tok(workdir, corpus):
    from lnfree.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(sorted(corpus.glob("*.txt")), 320, workdir / "tok")


@pytest.fixture(scope="module")
def cache(workdir, corpus, tok):
    return build_token_cache(str(corpus), tok, split="all", cache_root=workdir / "cache", num_proc=1,
                             progress=False)


def _save(hf_model, tok, path: Path) -> Path:
    hf_model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(tok):
    return make_hf_gpt2(vocab=len(tok), n_positions=64, seed=1)


@pytest.fixture(scope="module")
def model_dir(workdir, hf_model, tok) -> Path:
    return _save(hf_model, tok, workdir / "orig")


def _batches(cache, n_batches: int = 4):
    sampler = SequenceSampler(cache, CTX, shuffle=False)
    return list(sampler.iter_batches(BATCH))[:n_batches]


@torch.no_grad()
def _hf_token_losses(hf_model, batches) -> np.ndarray:
    """Per-token losses straight from `transformers`, (sequences, CTX − 1)."""
    rows = []
    for idx in batches:
        logits = hf_model(idx).logits
        rows.append(F.cross_entropy(logits[:, :-1].transpose(1, 2), idx[:, 1:], reduction="none"))
    return torch.cat(rows).numpy()


# ---- the protocol against transformers --------------------------------------------------------------------
def test_ce_equals_transformers_loss(model_dir, hf_model, cache):
    batches = _batches(cache)
    stats = evaluate_ce(load_model(model_dir), batches, progress=False, keep_token_losses=True)
    with torch.no_grad():
        hf_loss = np.mean([hf_model(idx, labels=idx).loss.item() for idx in batches])
    assert stats.n_tokens == len(batches) * BATCH * (CTX - 1)  # every next-token prediction, EOT included
    assert abs(stats.mean - hf_loss) <= 1e-5
    np.testing.assert_allclose(stats.token_losses, _hf_token_losses(hf_model, batches), atol=2e-5)


def test_stats_match_numpy(model_dir, hf_model, cache):
    batches = _batches(cache)
    stats = evaluate_ce(load_model(model_dir), batches, progress=False, top_k=3)
    ref = _hf_token_losses(hf_model, batches)
    flat = ref.reshape(-1)
    for value, expected in ((stats.median, np.median(flat)), (stats.p95, np.quantile(flat, 0.95)),
                            (stats.p999, np.quantile(flat, 0.999)), (stats.max, flat.max())):
        assert value == pytest.approx(float(expected), abs=1e-4)
    seq = ref.mean(1)
    assert [i for i, _ in stats.top_sequences] == list(np.argsort(-seq)[:3])
    assert [loss for _, loss in stats.top_sequences] == pytest.approx(np.sort(seq)[::-1][:3], abs=1e-5)


def test_summarize_finds_outlier_sequences():
    losses = np.full((50, 10), 2.0, dtype=np.float32)
    losses[[7, 31], 4] = 5e6  # the XL-on-the-Pile pattern: a huge mean from two sequences
    stats = summarize_losses(losses, top_k=2)
    assert stats.median == 2.0 and stats.max == 5e6
    assert {i for i, _ in stats.top_sequences} == {7, 31}
    assert stats.mean == pytest.approx(float(losses.astype(np.float64).mean()))
    assert json.loads(json.dumps(stats.to_dict()))["top_sequences"][0]["loss"] == pytest.approx(5e5 + 1.8)


def test_kl_against_direct_computation(model_dir, cache, tok):
    batches = _batches(cache, 2)
    model = load_model(model_dir)
    other_hf = make_hf_gpt2(vocab=len(tok), n_positions=64, seed=2)
    assert evaluate_ce(model, batches, reference=load_model(model_dir), progress=False).kl == pytest.approx(0, abs=1e-6)
    stats = evaluate_ce(model, batches, reference=load_model(_save(other_hf, tok, model_dir.parent / "other")),
                        progress=False)
    with torch.no_grad():
        kls = [F.kl_div(F.log_softmax(model(i)[:, :-1], -1), F.log_softmax(other_hf(i).logits[:, :-1], -1),
                        log_target=True, reduction="none").sum(-1).mean() for i in batches]
    assert stats.kl == pytest.approx(float(torch.stack(kls).mean()), rel=1e-4)


def test_bf16_runs_close_to_fp32(model_dir, cache):
    batches = _batches(cache, 2)
    fp32 = evaluate_ce(load_model(model_dir), batches, progress=False)
    bf16 = evaluate_ce(load_model(model_dir), batches, dtype="bf16", progress=False)
    assert np.isfinite(bf16.mean) and abs(bf16.mean - fp32.mean) < 0.05


# ---- published LN-free convention -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published_dir(workdir, model_dir, cache, tok) -> Path:
    """The tiny model in the published LN-free format: eps = 1e12, LN weights × 1e6/σ̂ (σ̂ calibrated)."""
    sigma = calibrate(load_model(model_dir), _batches(cache, 2))
    hf = make_hf_gpt2(vocab=len(tok), n_positions=64, seed=1)
    with torch.no_grad():
        for i, block in enumerate(hf.transformer.h):
            block.ln_1.weight.mul_(1e6 / sigma[f"blocks.{i}.ln1.qk"])
            block.ln_2.weight.mul_(1e6 / sigma[f"blocks.{i}.ln2"])
        hf.transformer.ln_f.weight.mul_(1e6 / sigma["ln_final"])
    hf.config.layer_norm_epsilon = 1e12
    return _save(hf, tok, workdir / "published")


def test_published_convention_equals_folded_twin(published_dir, cache):
    batches = _batches(cache)
    published = load_model(published_dir)
    folded = published.fold()
    assert not folded.has_normalization
    a = evaluate_ce(published, batches, progress=False)
    b = evaluate_ce(folded, batches, progress=False)
    assert abs(a.mean - b.mean) <= 1e-5 and abs(a.max - b.max) <= 1e-4
    with torch.no_grad():
        torch.testing.assert_close(published(batches[0]), folded(batches[0]), atol=1e-4, rtol=1e-4)
        import transformers

        hf = transformers.GPT2LMHeadModel.from_pretrained(published_dir).eval()
        hf_loss = np.mean([hf(i, labels=i).loss.item() for i in batches])
    assert abs(a.mean - hf_loss) <= 1e-5  # what the published file computes in transformers


# ---- comparison tables --------------------------------------------------------------------------------------
def test_compare_tables_with_delta(model_dir, published_dir, cache):
    models = {"orig": load_model(model_dir), "lnfree": load_model(published_dir).fold()}
    results = compare(models, {"corpus": cache}, ctx=CTX, batch_size=BATCH, max_tokens=CTX * BATCH * 3,
                      progress=False)
    results["benchmarks"] = {"hellaswag": {"orig": {"acc": 0.30, "acc_norm": 0.311},
                                           "lnfree": {"acc": 0.29, "acc_norm": 0.302}}}
    ce = results["ce"]["corpus"]
    assert results["models"]["lnfree"]["live_norm_sites"] == 0 < results["models"]["orig"]["live_norm_sites"]
    assert ce["orig"]["n_tokens"] == 3 * BATCH * (CTX - 1)
    rows = {(r["name"], r["metric"]): r for r in table_rows(results, "orig")}
    delta = rows[("corpus", "ce")]["delta"]["lnfree"]
    assert delta == pytest.approx(ce["lnfree"]["mean"] - ce["orig"]["mean"])
    assert rows[("hellaswag", "acc_norm")]["delta"]["lnfree"] == pytest.approx(-0.009)
    md = format_markdown(results, "orig")
    assert "| | orig | lnfree |" in md and f"({delta:+.4f})" in md and "31.10" in md and "(-0.90)" in md
    assert "p99.9" in md and "Highest-loss sequences" in md
    dumped = json.loads(json.dumps(with_table(results, "orig")))
    assert dumped["baseline"] == "orig" and dumped["table"][0]["delta"]["orig"] == 0
    with pytest.raises(ValueError, match="not one of the models"):
        format_markdown(results, "nope")


# ---- bad input ---------------------------------------------------------------------------------------------
def test_refuses_small_vocab_and_long_ctx(workdir, model_dir, cache, tok):
    small = load_model(_save(make_hf_gpt2(vocab=len(tok) - 20, n_positions=64), tok, workdir / "small"))
    with pytest.raises(ValueError, match="vocabulary"):
        check_compatible("small", small, "corpus", cache, CTX)
    with pytest.raises(ValueError, match="vocabulary"):  # also through the batch API
        evaluate_ce(small, _batches(cache, 1), progress=False)
    with pytest.raises(ValueError, match=r"--ctx 128 exceeds model orig's n_positions 64"):
        compare({"orig": load_model(model_dir)}, {"corpus": cache}, ctx=128, progress=False)
    with pytest.raises(ValueError, match="known: owt-val, pile, pile-filtered, stdlib-val"):
        load_eval_data("no-such-dataset", tok)


def test_cli_eval_end_to_end(workdir, model_dir, published_dir, corpus, capsys):
    from lnfree.cli import main

    out = workdir / "out"
    argv = ["eval", str(model_dir), str(published_dir), "--data", str(corpus), "--ctx", str(CTX),
            "--batch-size", str(BATCH), "--tokens", "400", "--names", "orig,pub", "--baseline", "orig",
            "--kl-reference", str(model_dir), "--cache-dir", str(workdir / "cache"), "--device", "cpu",
            "--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--quiet"]
    assert main(argv) == 0
    results = json.loads((out / "r.json").read_text())
    row = results["table"][0]
    assert set(row["values"]) == {"orig", "pub"} and row["delta"]["orig"] == 0
    assert results["ce"][str(corpus)]["orig"]["kl"] == pytest.approx(0, abs=1e-6)
    assert "KL(ref‖model)" in (out / "r.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(model_dir), "--data", "owt-val,nope", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown dataset 'nope'" in err  # refused before loading owt-val
    assert main(["eval", str(model_dir), "--data", str(corpus), "--ctx", "4096", "--quiet",
                 "--cache-dir", str(workdir / "cache")]) == 2
    assert "--ctx 4096 exceeds model orig's n_positions 64" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--data", str(corpus), "--batch-size", "0", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "lnfree: error: --batch-size must be at least 1, got 0"


# ---- lm-evaluation-harness ------------------------------------------------------------------------------------
@pytest.fixture
def in_task_dir(monkeypatch, workdir):
    """The local task's data_files path is relative to the working directory (lm-eval/datasets behaviour)."""
    monkeypatch.chdir(FIXTURES / "hellaswag_local")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(workdir / "hf_datasets"))


def _direct_hellaswag_scores(model, tok) -> tuple[float, float]:
    """HellaSwag's acc / acc_norm computed by hand: the stock preprocessing, then for every ending the summed
    log-probability of " " + ending after the query (split where the query's own tokens end, as lm-eval does);
    acc_norm divides by the ending's length in characters; inputs longer than the context keep their end."""
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    docs = process_docs(datasets.load_dataset("json", data_files="hellaswag_mini.jsonl", split="train"))
    hits, hits_norm = [], []
    for doc in docs:
        lls = []
        for ending in doc["choices"]:
            n_context = len(tok(doc["query"])["input_ids"])
            whole = tok(doc["query"] + " " + ending)["input_ids"]
            n_cont = len(whole) - n_context
            window = whole[-(model.config.n_positions + 1):]  # lm-eval keeps the last max_length + 1 tokens
            with torch.no_grad():
                logp = model(torch.tensor([window[:-1]])).log_softmax(-1)[0]
            lls.append(sum(logp[i - 1, window[i]].item() for i in range(len(window) - n_cont, len(window))))
        gold = int(doc["gold"])
        hits.append(max(range(4), key=lambda i: lls[i]) == gold)
        hits_norm.append(max(range(4), key=lambda i: lls[i] / len(doc["choices"][i])) == gold)
    return sum(hits) / len(hits), sum(hits_norm) / len(hits_norm)


def test_lm_eval_local_hellaswag(in_task_dir, model_dir, published_dir, tok):
    from lnfree.analysis.lmeval import run_benchmarks

    scores = run_benchmarks(model_dir, ["hellaswag_local"], include_path=".", device="cpu")
    row = scores["hellaswag_local"]
    acc, acc_norm = _direct_hellaswag_scores(load_model(model_dir).eval(), tok)
    assert row["n"] == 8 and row["acc"] == pytest.approx(acc) and row["acc_norm"] == pytest.approx(acc_norm)
    folded = load_model(published_dir).fold()  # a norm-free model object needs no transformers class
    row2 = run_benchmarks(folded, "hellaswag_local", include_path=".", tokenizer=tok, device="cpu", limit=4)
    assert row2["hellaswag_local"]["n"] == 4
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_benchmarks(model_dir, ["no_such_task"], include_path=".", device="cpu")


def test_lm_eval_adapter_scores_like_hflm(in_task_dir, model_dir):
    """Our adapter and stock HFLM on the transformers model give the same per-choice loglikelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from lnfree.analysis.lmeval import get_task_manager, make_lm

    def loglikelihoods(lm):
        out = simple_evaluate(model=lm, tasks=["hellaswag_local"], task_manager=get_task_manager("."),
                              log_samples=True, bootstrap_iters=0, limit=4)
        return [r[0][0] for s in out["samples"]["hellaswag_local"] for r in s["resps"]]

    ours = loglikelihoods(make_lm(model_dir, device="cpu"))
    stock = loglikelihoods(HFLM(pretrained=str(model_dir), device="cpu", batch_size=8))
    assert ours == pytest.approx(stock, abs=1e-4)


def _lm_eval_cli(*argv: str, out: Path) -> dict:
    """Run an lm-eval command line (a console script of this environment); its results file's task rows."""
    import subprocess
    import sys

    cmd = [str(Path(sys.executable).parent / argv[0]), *argv[1:], "--tasks", "hellaswag_local", "--include_path", ".",
           "--device", "cpu", "--batch_size", "4", "--output_path", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(max(out.rglob("results_*.json")).read_text())["results"]["hellaswag_local"]


def test_lm_eval_own_command_line_gives_our_scores_with_stderr(in_task_dir, model_dir, published_dir, workdir):
    """Stock `lm_eval` on the hf-compat form (a plain GPT2LMHeadModel, eps = 1e12), `lnfree-lm-eval --model hf` on
    the `hf` export and `--model lnfree` on a model folder: each gives our bridge's acc, acc_norm and stderr."""
    from lnfree.analysis.lmeval import run_benchmarks
    from lnfree.export.core import export_model

    ours = run_benchmarks(published_dir, ["hellaswag_local"], include_path=".", device="cpu",
                          output_path=workdir / "bridge_out", log_samples=True)["hellaswag_local"]
    n = ours["n"]
    for metric in ("acc", "acc_norm"):  # the standard error of a mean of 0/1 hits (sample std / √n)
        assert ours[f"{metric}_stderr"] == pytest.approx((ours[metric] * (1 - ours[metric]) / (n - 1)) ** 0.5)
    assert n == 8 and ours["acc_norm_stderr"] > 0
    assert list((workdir / "bridge_out").rglob("samples_hellaswag_local_*.jsonl"))  # lm-eval's own files
    export_model(str(published_dir), workdir / "published_hf", fmt="hf")
    runs = {"stock lm_eval, hf-compat": ("lm_eval", "--model", "hf", "--model_args", f"pretrained={published_dir}"),
            "lnfree-lm-eval, hf export": ("lnfree-lm-eval", "--model", "hf", "--model_args",
                                          f"pretrained={workdir / 'published_hf'}"),
            "lnfree-lm-eval, lnfree model": ("lnfree-lm-eval", "--model", "lnfree", "--model_args",
                                             f"pretrained={published_dir}")}
    for i, (what, argv) in enumerate(runs.items()):
        row = _lm_eval_cli(*argv, out=workdir / f"cli_out{i}")
        for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            assert row[f"{metric},none"] == pytest.approx(ours[metric]), (what, metric)


def test_one_resolver_for_every_command(workdir, model_dir, capsys):
    """A run folder without final/ is refused by eval in one line (and read from its newest checkpoint only by
    export, which then folds it); a finished run is read through its final/ everywhere."""
    from lnfree.cli import main
    from lnfree.models import save_model
    from lnfree.run.checkpoint import RunState, save_checkpoint
    from lnfree.sources import load_source, resolve_source

    run = workdir / "unfinished"
    model = load_model(model_dir)
    state = RunState(step=3, data={}, model_config=json.loads(
        (model_dir / "config.json").read_text()), family="gpt2", history=[])
    save_checkpoint(run, model, torch.optim.AdamW(model.parameters()), state)
    assert main(["eval", str(run), "--data", "stdlib-val", "--quiet"]) == 2
    assert "unfinished run" in capsys.readouterr().err
    loaded, where = load_source(run, unfinished_runs=True)
    assert where.checkpoint.name == "step_00000003" and where.run_dir == run and where.model_dir is None
    finished = workdir / "finished"
    save_model(model, finished / "final", tokenizer_from=model_dir)
    where = resolve_source(finished)
    assert where.model_dir == finished / "final" and where.run_dir == finished


def test_every_sequence_counts_whatever_the_batch_size(model_dir, cache):
    """CE is a property of the data, not of --batch-size: 1, 3 and 8 score the same sequences (the last batch
    smaller), also under a --tokens budget that ends mid-batch."""
    model = load_model(model_dir).eval()
    n_seq = cache.n_sequences(CTX)
    assert n_seq % 3 and n_seq % 8  # the batch sizes below do not divide the data
    for max_tokens, expected in ((None, n_seq), (CTX * 10, 10)):
        stats = [compare({"m": model}, {"d": cache}, ctx=CTX, batch_size=bs, max_tokens=max_tokens,
                         progress=False)["ce"]["d"]["m"] for bs in (1, 3, 8)]
        assert {s["n_tokens"] for s in stats} == {expected * (CTX - 1)}
        assert stats[1]["mean"] == pytest.approx(stats[0]["mean"], abs=1e-6)
        assert stats[2]["mean"] == pytest.approx(stats[0]["mean"], abs=1e-6)
