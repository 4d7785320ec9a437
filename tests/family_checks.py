"""Checks every non-GPT-2 family's tests share: σ̂ as after a real run, a short removal run ending verified,
TransformerLens and nnsight on the folded model. The families' own test files supply the models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from conftest import random_tokens
from lnfree.export.verify import verify
from lnfree.method.calibrate import apply_site_states, calibrate
from lnfree.method.schedule import SiteState
from lnfree.models import load_model, save_model


def perturbed(model, noise: float):
    """A random transformers model with every weight moved by N(0, noise) (norm gains and biases not trivial)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model.eval()


def logits_of(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out


def frozen_with_distinct_sigmas(folder):
    """Calibrated, every site frozen with its own σ̂ (Q/K and V paths differ, as after a real run)."""
    model = load_model(folder).eval()
    calibrate(model, [random_tokens(seed=s) for s in range(2)])
    with torch.no_grad():
        for i, site in enumerate(model.norm_sites().values()):
            site.sigma.mul_(1.0 + 0.37 * (i % 3) + 0.05 * i)
    apply_site_states(model, {name: SiteState(True, 0.0, 0.0) for name in model.norm_sites()})
    return model


def removal_run_ends_verified(hf_model, tmp_path: Path, preset: str) -> str:
    """Fine-tune `hf_model` (its vocabulary resized to a local BPE) for 8 steps on stdlib text with `preset`;
    asserts `verify` passes on the run and returns the final model's architecture."""
    from lnfree.run.runs import run_removal
    from lnfree.tokenizer import train_bpe_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(os.__file__).parent
    for i, name in enumerate(["json/decoder.py", "textwrap.py", "shlex.py"]):
        (corpus / f"doc{i}.txt").write_text((stdlib / name).read_text())
    tok = train_bpe_tokenizer(sorted(corpus.iterdir()), 300, tmp_path / "tok")
    hf_model.resize_token_embeddings(len(tok))
    hf_model.config.eos_token_id = hf_model.config.bos_token_id = tok.eos_token_id
    hf_model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    overrides = {"steps": 8, "batch_tokens": 4 * 32, "micro_batch": 2, "ctx": 32, "checkpoint_every": 4}
    run_removal(str(tmp_path / "model"), str(corpus), tmp_path / "run", preset=preset, overrides=overrides,
                cache_root=tmp_path / "cache", progress=False)
    report = verify(tmp_path / "run")
    assert report.passed, report.failures
    return json.loads((tmp_path / "run" / "final" / "config.json").read_text())["architectures"][0]


def interop_reads_the_folded_model(hf_folder: Path, tmp_path: Path) -> None:
    """TransformerLens' adapter and nnsight run the folded model exactly, with identity norm hooks."""
    from lnfree.interop import to_nnsight, to_transformer_lens
    from test_export import save_word_tokenizer

    folded = frozen_with_distinct_sigmas(hf_folder).fold().eval()
    save_model(folded, tmp_path / "folded")
    save_word_tokenizer(tmp_path / "folded")
    idx = random_tokens(batch=1, seq=12, seed=8)
    ours: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        expected = folded(idx, cache=ours)
    bridge = to_transformer_lens(tmp_path / "folded")
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(idx)
    assert (logits - expected).abs().max().item() <= 1e-5
    assert (cache["blocks.1.hook_resid_pre"] - ours["blocks.1.hook_resid_pre"]).abs().max().item() <= 1e-5
    assert torch.equal(cache["blocks.0.ln1.hook_normalized"], cache["blocks.0.hook_resid_pre"])  # identity norm
    lm = to_nnsight(tmp_path / "folded")
    with lm.trace(idx):
        out = lm.lm_head.output.save()
    assert (out - expected).abs().max().item() <= 1e-5
