"""`lnfree compare`: a model against itself is exact (KL 0, similarity 1, identical effect maps); a copy with one
head perturbed puts that head first in every per-head table; DLA sums to the logit and its direct effects match a
brute-force read-out; patching matches hooks on the transformers model; bad input is one line. Every family."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import transformers

from conftest import make_hf_gpt2, random_tokens
from family_checks import frozen_with_distinct_sigmas
from lnfree.analysis.compare import compare_models
from lnfree.analysis.compare_measures import expected_calibration_error, js_per_head, token_dla
from lnfree.analysis.patching import PROMPT_SETS, patch_heads, prompt_set_path, read_prompt_set, run_with_cache
from lnfree.cli import main
from lnfree.models import load_model, save_model
from lnfree.tokenizer import load_tokenizer
from test_export import save_word_tokenizer
from test_llama import make_hf as make_llama
from test_neox import make_hf as make_neox

FAMILIES = {"gpt2": lambda: make_hf_gpt2(n_layer=2, n_head=4, n_embd=48), "neox": lambda: make_neox("pythia-parallel"),
            "llama-gqa": lambda: make_llama("llama-gqa-untied"), "qwen3": lambda: make_llama("qwen3-gqa-tied")}
PROMPT_ROWS = [  # word-level prompts of several lengths (rows are right-padded): the answer flips with one word
    {"clean": "w1 w2 w3 w1", "corrupt": "w1 w2 w3 w2", "answer": "w3", "wrong": "w2"},
    {"clean": "w4 w5 w6 w7 w8 w4", "corrupt": "w4 w5 w6 w7 w8 w5", "answer": " w6", "wrong": " w5"},
    {"clean": "w9 w10 w11 w12 w9 w10 w11 w12 w9", "corrupt": "w9 w10 w11 w12 w9 w10 w11 w12 w13",
     "answer": "w10", "wrong": "w14"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (our model of a random transformers checkpoint with its norms, its LN-free (folded) twin)."""
    out = {}
    for family, make in FAMILIES.items():
        folder = tmp_path_factory.mktemp(family)
        make().save_pretrained(folder)
        out[family] = (load_model(folder).eval(), frozen_with_distinct_sigmas(folder).fold().eval())
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    save_word_tokenizer(root)
    return read_prompt_set(str(write_jsonl(root / "words.jsonl", PROMPT_ROWS)), load_tokenizer(root))


def batches():
    return [random_tokens(batch=3, seq=24, seed=s) for s in (1, 2)]


def query_rows(model, layer: int, head: int) -> torch.Tensor:
    """The rows of the query projection that make `head`'s queries (a view), per family."""
    dh = model.output_projections()[layer][0].in_features // dict(model.architecture_rows())["heads"]
    rows = slice(head * dh, (head + 1) * dh)
    if model.family == "gpt2":
        return model.h[layer].attn.c_attn.weight[rows]
    if model.family == "gpt_neox":
        attn = model.layers[layer].attention
        return attn.query_key_value.weight.view(attn.n_head, 3, dh, -1)[head, 0]
    return model.layers[layer].self_attn.q_proj.weight[rows]


@torch.no_grad()
def perturb_head(model, layer: int, head: int, seed: int = 0) -> None:
    """Move one head's query rows and output columns by noise of their own size."""
    gen = torch.Generator().manual_seed(seed)
    attn_out = model.output_projections()[layer][0]
    dh = attn_out.in_features // dict(model.architecture_rows())["heads"]
    for w in (query_rows(model, layer, head), attn_out.weight[:, head * dh:(head + 1) * dh]):
        w.add_(torch.randn(w.shape, generator=gen) * w.std())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_compared_with_itself_is_exact(family, models, prompts):
    _, free = models[family]
    r = compare_models(copy.deepcopy(free), free, batches(), vanilla=copy.deepcopy(free), prompt_sets=[prompts],
                       progress=False)
    out, layers = r["outputs"], r["shape"]["layers"]
    for name in ("original", "vanilla"):
        assert out["kl_to_lnfree"][name]["mean"] == 0 and out["kl_to_lnfree"][name]["max"] == 0
        assert out["top1_agreement_with_lnfree"][name] == 1.0
        assert out["models"][name]["entropy"] == out["models"]["lnfree"]["entropy"]
        assert out["models"][name]["ece"] == out["models"]["lnfree"]["ece"]
        mech = r["mechanism"]["lnfree" if name == "original" else "vanilla"]
        assert np.all(np.asarray(mech["attention_similarity"]) == 1.0)
        assert [row["correlation"] for row in mech["dla_per_layer"]] == [1.0] * layers
        assert all(c["relative_change"] == 0.0 for c in mech["dla_components"])
        assert mech["neurons"]["mean_correlation_per_layer"] == [1.0] * layers
    patching = r["patching"][prompts.name]
    maps = [np.asarray(patching["models"][n]["delta"]) for n in ("original", "lnfree", "vanilla")]
    assert np.abs(maps[0]).max() > 1e-3  # a real effect map, not zeros
    assert all(np.array_equal(maps[0], m) for m in maps[1:])
    assert patching["correlation"] == {"lnfree": 1.0, "vanilla": 1.0}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_perturbed_head_ranks_first_in_every_per_head_table(family, models, prompts):
    _, free = models[family]
    changed = copy.deepcopy(free)
    perturb_head(changed, layer=0, head=1)
    r = compare_models(changed, free, batches(), prompt_sets=[prompts], progress=False)
    mech = r["mechanism"]["lnfree"]
    assert r["outputs"]["kl_to_lnfree"]["original"]["mean"] > 0
    assert mech["heads_by_similarity"][0]["head"] == "L0H1" and mech["heads_by_similarity"][0]["similarity"] < 1
    assert mech["heads_by_dla_change"][0]["component"] == "L0H1"
    assert r["patching"][prompts.name]["heads_by_change"][0]["head"] == "L0H1"


@pytest.mark.parametrize("family", FAMILIES)
def test_dla_sums_to_the_logit_and_direct_effects_match_a_brute_force_read_out(family, models):
    ln_model, free = (copy.deepcopy(m).double() for m in models[family])
    idx = random_tokens(batch=2, seq=16, seed=3)
    target = idx[:, 1:]
    for model in (free, ln_model):
        logits, cache = run_with_cache(model, idx)
        names, dla, bias, de = token_dla(model, cache, idx)
        centred = logits[:, :-1] - logits[:, :-1].mean(-1, keepdim=True)  # (B, T−1, V)
        want = centred.gather(-1, target.unsqueeze(-1))[..., 0]
        torch.testing.assert_close(dla.sum(0) + bias, want, atol=1e-10, rtol=0)  # exact on both (frozen scale)
        # direct effect: the centred logit of the correct token minus that without the component, through the
        # model's own final norm module
        w_u, _, ln = model.unembedding()  # the head's bias cancels in a difference
        read = lambda x, ln=ln, w_u=w_u: (ln(x)[0] if ln is not None else x) @ w_u.T
        resid = cache[f"blocks.{model.n_layers - 1}.hook_resid_post"][:, :-1]
        _, comps = model.residual_components(cache)
        full = read(resid)
        for c in (names.index("L0H1"), names.index("L1MLP"), 0):
            without = read(resid - comps[c, :, :-1])
            ref = (full - full.mean(-1, keepdim=True) - without + without.mean(-1, keepdim=True)).gather(
                -1, target.unsqueeze(-1))[..., 0]
            torch.testing.assert_close(de[c], ref, atol=1e-10, rtol=0)
        error = ((dla - de).abs().sum() / de.abs().sum()).item()
        assert error < 1e-12 if model is free else error > 1e-3  # exact only without a final norm


def test_js_similarity_and_calibration_error_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    p, q = (torch.randn(2, 3, 5, 5, generator=g).masked_fill(causal, -math.inf).softmax(-1) for _ in range(2))
    want = np.zeros(3)
    for b in range(2):
        for h in range(3):
            for t in range(1, 5):
                a, c = p[b, h, t, : t + 1].double().numpy(), q[b, h, t, : t + 1].double().numpy()
                m = (a + c) / 2
                want[h] += 0.5 * (a * np.log(a / m)).sum() + 0.5 * (c * np.log(c / m)).sum()
    np.testing.assert_allclose(js_per_head(p.double(), q.double()).numpy(), want, rtol=1e-9)
    ece, rows = expected_calibration_error(np.array([0.05, 0.95, 0.95, 0.5]), np.array([0, 1, 0, 1]))
    assert ece == pytest.approx(0.05 / 4 + 0.45 * 2 / 4 + 0.5 / 4)
    assert [r["n"] for r in rows if r["n"]] == [1, 1, 2] and len(rows) == 15


def test_head_patching_matches_hooks_on_the_transformers_model(tmp_path, prompts):
    hf = make_hf_gpt2(n_layer=2, n_head=4, n_embd=48)
    hf.save_pretrained(tmp_path / "hf")
    got = patch_heads(load_model(tmp_path / "hf").eval(), prompts)["delta"]
    rows = torch.arange(len(prompts.last))
    logit_diff = lambda out: (out.logits[rows, prompts.last, prompts.answer]
                              - out.logits[rows, prompts.last, prompts.wrong])
    with torch.no_grad():
        clean = logit_diff(hf(prompts.clean))
        want = np.zeros((2, 4))
        for layer in range(2):
            c_proj = hf.transformer.h[layer].attn.c_proj
            seen = {}
            handle = c_proj.register_forward_pre_hook(lambda _m, args, seen=seen: seen.setdefault("z", args[0]))
            hf(prompts.corrupt)
            handle.remove()
            for head in range(4):
                cols = slice(head * 12, (head + 1) * 12)

                def patch(_m, args, cols=cols, seen=seen):
                    x = args[0].clone()
                    x[..., cols] = seen["z"][..., cols]
                    return (x,)

                handle = c_proj.register_forward_pre_hook(patch)
                want[layer, head] = (logit_diff(hf(prompts.clean)) - clean).mean().item()
                handle.remove()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_prompt_rows_are_named_in_one_line(tmp_path, prompts):
    save_word_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    bad = {"answer": {**PROMPT_ROWS[0], "answer": "w3 w4"}, "length": {**PROMPT_ROWS[0], "corrupt": "w1 w2 w3"},
           "same": {**PROMPT_ROWS[0], "wrong": "w3"}}
    for kind, row in bad.items():
        path = write_jsonl(tmp_path / f"{kind}.jsonl", [PROMPT_ROWS[1], row])
        with pytest.raises(ValueError) as err:
            read_prompt_set(str(path), tok)
        assert f"{path} row 2:" in str(err.value) and "\n" not in str(err.value)
    assert "answer 'w3 w4' is 2 tokens" in _error(read_prompt_set, str(tmp_path / "answer.jsonl"), tok)
    assert "clean and corrupt are 4 and 3 tokens" in _error(read_prompt_set, str(tmp_path / "length.jsonl"), tok)


def _error(fn, *args) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        fn(*args)
    return str(err.value)


def test_mismatched_models_are_refused_naming_the_mismatch(models, tmp_path):
    _, gpt2 = models["gpt2"]
    _, neox = models["neox"]
    make_hf_gpt2(n_layer=3, n_head=4, n_embd=48).save_pretrained(tmp_path)
    deeper = frozen_with_distinct_sigmas(tmp_path).fold()
    assert "differ in layers: 2 vs 3" in _error(compare_models, gpt2, deeper, batches())
    assert "differ in family: gpt2 vs gpt_neox" in _error(compare_models, gpt2, neox, batches())


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """A GPT-2 with its norms, its LN-free twin and a vanilla copy (word tokenizer each), word-level data."""
    root = tmp_path_factory.mktemp("cli")
    hf = make_hf_gpt2(n_layer=2, n_head=4, n_embd=48)
    hf.save_pretrained(root / "original")
    save_word_tokenizer(root / "original")
    save_model(frozen_with_distinct_sigmas(root / "original").fold(), root / "lnfree", tokenizer_from=root / "original")
    vanilla = copy.deepcopy(hf)
    with torch.no_grad():
        for p in vanilla.parameters():
            p.mul_(1.01)
    vanilla.save_pretrained(root / "vanilla")
    save_word_tokenizer(root / "vanilla")
    g = torch.Generator().manual_seed(5)
    (root / "data").mkdir()
    for i in range(3):
        words = torch.randint(0, 100, (400,), generator=g).tolist()
        (root / "data" / f"doc{i}.txt").write_text(" ".join(f"w{w}" for w in words))
    write_jsonl(root / "prompts.jsonl", PROMPT_ROWS)
    return root


def test_cli_writes_the_report_and_its_figures_agree_with_evaluate(run_dirs, capsys):
    from lnfree.analysis.eval_data import eval_batches, load_eval_data
    from lnfree.analysis.evaluate import evaluate_ce

    root, out = run_dirs, run_dirs / "report"
    args = ["compare", str(root / "original"), str(root / "lnfree"), "--vanilla", str(root / "vanilla"), "--data",
            str(root / "data"), "--out", str(out), "--tokens", "256", "--ctx", "32", "--batch-size", "3",
            "--prompts", str(root / "prompts.jsonl"), "--cache-dir", str(root / "cache"), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "KL(original ‖ LN-free)" in printed and f"wrote {out / 'report.md'}" in printed
    r = json.loads((out / "report.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "heads.png", "dla_layers.png",
                                                "entropy.png", "neurons.png"}
    text = (out / "report.md").read_text()
    assert "## Patching: prompts" in text and r["command"].startswith("lnfree compare ") and r["command"] in text
    # the outputs section against the evaluation protocol's own CE and KL on the same sequences
    tok = load_tokenizer(root / "original")
    cache = load_eval_data(str(root / "data"), tok, cache_root=root / "cache", progress=False)
    lnfree = load_model(root / "lnfree")
    for name in ("original", "vanilla"):
        batches, n, _ = eval_batches(cache, 32, 3, 256)
        ref = evaluate_ce(lnfree, list(batches), reference=load_model(root / name), progress=False)
        assert r["outputs"]["kl_to_lnfree"][name]["mean"] == pytest.approx(ref.kl, rel=1e-5)
        assert r["outputs"]["models"]["lnfree"]["ce"] == pytest.approx(ref.mean, rel=1e-5)
    assert r["tokens"] == 8 * 31 and r["outputs"]["models"]["original"]["dla_error_vs_direct_effect"] > 0.01


def test_cli_bad_input_is_one_line(run_dirs, tmp_path, capsys):
    root = run_dirs
    other = tmp_path / "other-tokenizer"
    transformers.GPT2LMHeadModel.from_pretrained(root / "original").save_pretrained(other)
    save_word_tokenizer(other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {("v" + k[1:] if k.startswith("w") else k): i for k, i in tok["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(tok))
    bad_prompts = write_jsonl(tmp_path / "bad.jsonl", [PROMPT_ROWS[0], {**PROMPT_ROWS[1], "wrong": "w5 w6"}])
    base = ["--data", str(root / "data"), "--out", str(tmp_path / "out"), "--cache-dir", str(root / "cache"),
            "--quiet"]
    cases = {
        (str(other), str(root / "lnfree")): "have different tokenizers",
        (str(root / "original"), str(root / "vanilla")): "cannot fold",  # a model with live norms as LNFREE
        (str(root / "original"), str(root / "lnfree"), "--prompts", str(bad_prompts)):
            "bad.jsonl row 2: wrong 'w5 w6' is 2 tokens",
    }
    capsys.readouterr()  # transformers' own progress bars while setting up
    for argv, message in cases.items():
        assert main(["compare", *argv, *base]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_the_packaged_prompt_sets_are_well_formed():
    from tokenizers import Tokenizer, models, pre_tokenizers

    for name in PROMPT_SETS:
        rows = [json.loads(line) for line in prompt_set_path(name).read_text().splitlines()]
        assert len(rows) >= 40
        words = sorted({w for r in rows for k in ("clean", "corrupt", "answer", "wrong") for w in r[k].split()})
        backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        ps = read_prompt_set(name, transformers.PreTrainedTokenizerFast(tokenizer_object=backend))
        assert ps.clean.shape[0] == len(rows)
        for r in rows:  # the corrupt prompt flips the answer: IOI repeats the other name, stdlib names the other
            clean, corrupt, answer, wrong = r["clean"].split(), r["corrupt"].split(), r["answer"], r["wrong"]
            assert sum(a != b for a, b in zip(clean, corrupt, strict=True)) >= 1
            if name == "ioi-gpt2":  # the indirect object is named once, the subject twice
                assert clean.count(answer.strip()) == 1 and clean.count(wrong.strip()) == 2
                assert corrupt.count(answer.strip()) == 2 and corrupt.count(wrong.strip()) == 1
            else:
                assert answer.strip() in r["clean"] and wrong.strip() in r["corrupt"]
