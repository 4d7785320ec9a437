"""Shared fixtures: tiny random GPT-2 checkpoints made with `transformers` itself (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 101
EOT = VOCAB - 1


def make_hf_gpt2(n_layer=2, n_head=4, n_embd=48, vocab=VOCAB, n_positions=64, seed=0, noise=0.1):
    """A random transformers GPT2LMHeadModel, with LN weights/biases perturbed so they are not trivial."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                  n_head=n_head, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


@pytest.fixture
def hf_gpt2_dir(tmp_path):
    model = make_hf_gpt2()
    path = tmp_path / "hf_gpt2"
    model.save_pretrained(path)
    return path


def random_tokens(batch=3, seq=24, vocab=VOCAB, seed=0, eot_every=7):
    """Token ids with EOT tokens sprinkled in (EOT positions get special treatment in the method)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab - 1, (batch, seq), generator=g)
    idx[:, eot_every::eot_every] = vocab - 1
    return idx


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A local text corpus, a BPE tokenizer trained on it, and a random GPT-2 folder with that tokenizer."""
    from lnfree.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("setup")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(os.__file__).parent
    for i, name in enumerate(["json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "glob.py"]):
        (corpus / f"doc{i}.txt").write_text((stdlib / name).read_text())
    tok = train_bpe_tokenizer(sorted(corpus.iterdir()), 300, root / "tok")
    hf = make_hf_gpt2(n_layer=2, n_head=2, n_embd=32, vocab=len(tok), n_positions=32, noise=0.02)
    hf.config.eos_token_id = hf.config.bos_token_id = tok.eos_token_id
    model_dir = root / "model"
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return {"corpus": corpus, "model": model_dir, "cache": root / "cache", "root": root}


def rewind_copy(run: Path, to: Path, later: tuple[str, ...] = ("step_00000009", "step_00000012")) -> Path:
    """A copy of a finished run taken back to an earlier checkpoint: the `later` ones and final/ removed, so that
    `--resume` must redo the rest."""
    import shutil

    shutil.copytree(run, to)
    for name in later:
        shutil.rmtree(to / "checkpoints" / name)
    shutil.rmtree(to / "final")
    return to
