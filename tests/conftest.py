"""Shared fixtures: tiny random GPT-2 checkpoints made with `transformers` itself (no downloads)."""

from __future__ import annotations

import os

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
