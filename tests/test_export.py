"""`lnfree export`: hf / hf-compat checkpoints reload with parity in plain transformers; bad input writes nothing.

The builders at the top (a folded tiny model, a published-convention eps=1e12 model, a word-level tokenizer)
are shared with test_interop.py and test_verify.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from conftest import EOT, VOCAB, make_hf_gpt2, random_tokens
from lnfree.cli import main
from lnfree.export import compat
from lnfree.export.core import PARITY_TOL, ParityError, export_model, load_norm_free
from lnfree.method.calibrate import apply_site_states, calibrate
from lnfree.method.schedule import Schedule, SiteState
from lnfree.models import load_model, save_model
from lnfree.run.config import TrainConfig
from lnfree.run.record import RunRecord, RunSource

PUBLISHED_EPS = 1e12


# ---- shared builders ------------------------------------------------------------------------------------------
def save_word_tokenizer(folder: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer ("w0 w1 …", EOT = <|endoftext|>) matching the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 1)} | {"<|endoftext|>": vocab - 1}
    backend = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                         bos_token="<|endoftext|>", unk_token="<|endoftext|>").save_pretrained(folder)


def frozen_model(hf_dir: Path, distinct: bool = False):
    """Our model of an HF GPT-2, calibrated and with every site frozen (no specials), in eval mode. `distinct`
    gives every site its own σ̂ (ln_1's Q/K and V paths differ, as after a real run)."""
    model = load_model(hf_dir).eval()
    calibrate(model, [random_tokens(seed=s) for s in range(2)])
    if distinct:
        with torch.no_grad():
            for i, site in enumerate(model.norm_sites().values()):
                site.sigma.mul_(1.0 + 0.37 * (i % 3) + 0.05 * i)
    apply_site_states(model, {name: SiteState(True, 0.0, 0.0) for name in model.norm_sites()})
    return model


def make_dirs(root: Path) -> dict[str, Path]:
    """ln: a tiny GPT-2 with live LNs; folded: its LN-free twin (+ tokenizer); published: the same function in
    the published eps=1e12 convention (LN weights ×1e6/σ̂, one σ̂ per LN)."""
    root.mkdir(parents=True, exist_ok=True)
    hf = make_hf_gpt2()
    hf.save_pretrained(root / "ln")
    save_word_tokenizer(root / "ln")
    model = frozen_model(root / "ln")
    save_model(model.fold(), root / "folded", tokenizer_from=root / "ln")
    # published: ln_1's Q/K and V paths share one σ̂ in that convention
    sigmas = {name: site.sigma.item() for name, site in model.norm_sites().items()}
    with torch.no_grad():
        for i, block in enumerate(hf.transformer.h):
            block.ln_1.weight.mul_(1e6 / sigmas[f"blocks.{i}.ln1.qk"])
            block.ln_2.weight.mul_(1e6 / sigmas[f"blocks.{i}.ln2"])
        hf.transformer.ln_f.weight.mul_(1e6 / sigmas["ln_final"])
    hf.config.layer_norm_epsilon = PUBLISHED_EPS
    hf.save_pretrained(root / "published")
    save_word_tokenizer(root / "published")
    return {"ln": root / "ln", "folded": root / "folded", "published": root / "published"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_dirs(tmp_path_factory.mktemp("models"))


def hf_logits(folder: Path, idx: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(idx).logits


def ours_logits(folder: Path, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_norm_free(folder).model(idx)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ---- formats ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,arch", [("hf", "LNFreeGPT2LMHeadModel"), ("hf-compat", "GPT2LMHeadModel")])
def test_every_format_reloads_with_parity(tmp_path, dirs, fmt, arch):
    result = export_model(dirs["folded"], tmp_path / "out", fmt)
    assert result.max_abs <= PARITY_TOL[fmt]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    idx = random_tokens(batch=2, seq=40, seed=5)
    ref = ours_logits(dirs["folded"], idx)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == arch
    with torch.no_grad():
        assert (reloaded(idx).logits - ref).abs().max().item() <= 1e-4  # float32 logits
    assert (ours_logits(tmp_path / "out", idx) - ref).abs().max().item() <= 1e-4  # float32 logits
    # tokenizer files travel with the export; a README card is written
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert "LayerNorm-free" in (tmp_path / "out" / "README.md").read_text()
    assert leftovers(tmp_path) == []


def test_hf_format_has_no_normalization_and_an_untied_biased_head(tmp_path, dirs):
    export_model(dirs["folded"], tmp_path / "out", "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert model.lm_head.bias is not None
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "lnfree_gpt2"


def test_compat_format_is_the_published_convention(tmp_path, dirs):
    export_model(dirs["folded"], tmp_path / "out", "hf-compat")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    assert model.config.layer_norm_epsilon == 1e12 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    for block in model.transformer.h:
        for ln in (block.ln_1, block.ln_2):
            assert ln.eps == 1e12 and torch.all(ln.weight == 1e6) and torch.all(ln.bias == 0)


@pytest.mark.parametrize("fmt", ["hf", "hf-compat"])
def test_published_convention_model_exports_exactly(tmp_path, dirs, fmt):
    # The published file is a plain GPT2LMHeadModel; our loader reads it as frozen sites and folds it.
    src = load_norm_free(dirs["published"])
    assert src.folded_here and not src.model.has_normalization
    export_model(dirs["published"], tmp_path / "out", fmt)
    idx = random_tokens(batch=2, seq=40, seed=6)
    published = hf_logits(dirs["published"], idx)
    assert (hf_logits(tmp_path / "out", idx) - published).abs().max().item() <= 1e-4  # float32 logits
    # and it is the same function as the folded calibrated model it was made from
    assert (hf_logits(tmp_path / "out", idx) - ours_logits(dirs["folded"], idx)).abs().max().item() <= 1e-4


def test_hf_export_loads_after_import_lnfree_in_a_fresh_interpreter(tmp_path, dirs):
    """The registration hook: `import lnfree` alone is cheap (no transformers), then plain Auto classes work."""
    export_model(dirs["folded"], tmp_path / "out", "hf")
    code = ("import sys\n"
            "import lnfree\n"
            "assert 'transformers' not in sys.modules, 'import lnfree pulled in transformers'\n"
            "from transformers import AutoModelForCausalLM\n"
            "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "LNFreeGPT2LMHeadModel"


# ---- the head and compat's limits ---------------------------------------------------------------------------------
def test_untie_head_recovers_the_final_norm():
    torch.manual_seed(0)
    wte, g, beta = torch.randn(VOCAB, 16), torch.rand(16) + 0.5, torch.randn(16)
    m = wte * g
    w_u, b_u = m - m.mean(1, keepdim=True), wte @ beta  # the fold of a tied head
    g2, beta2, residual = compat.untie_head(wte, w_u, b_u)
    assert residual < 1e-6
    assert torch.allclose(g2.float(), g, atol=1e-5) and torch.allclose(beta2.float(), beta, atol=1e-5)


def test_compat_refuses_a_head_a_tied_gpt2_cannot_express(tmp_path, dirs):
    model = load_norm_free(dirs["folded"]).model
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.1)  # e.g. trained untied
    save_model(model, tmp_path / "untied")
    with pytest.raises(compat.HeadNotTiedError, match="use --format hf") as e:
        export_model(tmp_path / "untied", tmp_path / "out", "hf-compat")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert export_model(tmp_path / "untied", tmp_path / "out", "hf").max_abs <= PARITY_TOL["hf"]  # hf still works


# ---- bad input and atomicity ------------------------------------------------------------------------------------
def test_live_layernorm_is_refused_in_one_line_and_nothing_is_written(tmp_path, dirs, capsys):
    with pytest.raises(ValueError, match=r"7 of 7 site\(s\) still live") as e:
        export_model(dirs["ln"], tmp_path / "out")
    assert "\n" not in str(e.value)
    assert main(["export", str(dirs["ln"]), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lnfree: error:") and "still live" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_special_sigma_is_refused(tmp_path, dirs):
    model = frozen_model(dirs["ln"])
    next(iter(model.norm_sites().values())).bos_weight.fill_(1.0)
    with pytest.raises(ValueError, match="special σ̂"):
        from lnfree.export.core import as_norm_free

        as_norm_free(model)


def test_missing_folder_is_one_line_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such model folder" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_parity_failure_leaves_nothing_and_keeps_an_old_export(tmp_path, dirs, monkeypatch):
    out = tmp_path / "out"
    export_model(dirs["folded"], out, "hf")
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr("lnfree.export.core.reload_parity", lambda *a: ({"transformers": 0.5, "lnfree": 0.0}, {}))
    with pytest.raises(ParityError, match="nothing written"):
        export_model(dirs["folded"], out, "hf-compat", overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before  # the old export is untouched
    assert json.loads((out / "config.json").read_text())["model_type"] == "lnfree_gpt2"
    assert leftovers(tmp_path) == []


def test_an_export_off_by_one_part_in_a_million_is_refused(tmp_path, dirs, monkeypatch):
    """The float64 gate is what a correct fold achieves (~1e-12), not 1e-4: a head scaled by 1 + 1e-6 — far
    below float32 noise on real-size logits, but wrong — must not be written."""
    import lnfree.export.core as core

    write = core.write_format

    def slightly_off(model, folder, fmt):
        model = copy.deepcopy(model)
        with torch.no_grad():
            model.lm_head.weight.mul_(1 + 1e-6)
        write(model, folder, fmt)

    monkeypatch.setattr(core, "write_format", slightly_off)
    with pytest.raises(ParityError, match="parity check"):
        export_model(dirs["folded"], tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()


def test_export_replaces_an_old_export_but_not_other_folders(tmp_path, dirs):
    export_model(dirs["folded"], tmp_path / "out", "hf")
    with pytest.raises(FileExistsError, match="--overwrite to replace it"):
        export_model(dirs["folded"], tmp_path / "out", "hf-compat")
    export_model(dirs["folded"], tmp_path / "out", "hf-compat", overwrite=True)  # replaced on success
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gpt2"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="lnfree export did not write"):
        export_model(dirs["folded"], tmp_path / "docs", "hf", overwrite=True)
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"
    # a file the user put into an earlier export is not the export's to replace either (issue 21's probe)
    (tmp_path / "out" / "notes.txt").write_text("mine too")
    with pytest.raises(FileExistsError, match=r"did not write \(notes.txt\)"):
        export_model(dirs["folded"], tmp_path / "out", "hf", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine too"


def test_cli_export_reports_parity(tmp_path, dirs, capsys):
    assert main(["export", str(dirs["folded"]), "--out", str(tmp_path / "out"), "--format", "hf-compat"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {tmp_path / 'out'} (hf-compat)") and "transformers" in line


@pytest.mark.parametrize("fmt", ["hf", "hf-compat"])
def test_run_checkpoint_with_distinct_path_sigmas_exports_its_function(tmp_path, dirs, fmt):
    """A run checkpoint (frozen sites, unfolded) whose ln_1 Q/K and V paths froze at different σ̂: the export
    must compute what the FakeLN model computes — a fold that swapped or shared the two σ̂ would not."""
    from lnfree.run.checkpoint import RunState, save_checkpoint

    model = frozen_model(dirs["ln"], distinct=True)
    qk, v = model.h[0].ln_1.sites
    assert v.sigma.item() > 1.2 * qk.sigma.item()
    state = RunState(step=7, data={}, model_config=json.loads(
        (dirs["ln"] / "config.json").read_text()), family="gpt2", history=[])
    save_checkpoint(tmp_path / "run", model, torch.optim.AdamW(model.parameters()), state)
    with pytest.raises(ValueError, match="unfinished run .*step 7 of .*--allow-partial"):
        export_model(tmp_path / "run", tmp_path / "out", fmt)  # a run without final/ is not silently exported
    export_model(tmp_path / "run", tmp_path / "out", fmt, allow_partial=True)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**Partial:** taken from an unfinished run's checkpoint at step 7" in card
    idx = random_tokens(batch=2, seq=40, seed=7)
    with torch.no_grad():
        expected = model(idx)
    assert (hf_logits(tmp_path / "out", idx) - expected).abs().max().item() <= 1e-4


# ---- model card ----------------------------------------------------------------------------------------------
def test_card_uses_run_files_when_present(tmp_path, dirs):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for f in dirs["folded"].iterdir():
        (run / "final" / f.name).write_bytes(f.read_bytes())
    RunRecord("lnfree", TrainConfig(lr=6e-4, steps=300), Schedule(total_steps=300, freeze_at={}),
              RunSource(data="stdlib", preset="baroni2025")).write(run)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"step": s, "loss": 3.0 - s / 100, "tokens": 512 * (s + 1), "frozen_sites": s, "n_sites": 2,
         "events": ["blocks.0.ln2"] if s == 1 else []}) for s in range(3)) + "\n")
    (run / "eval_owt.json").write_text(json.dumps({"owt": {"ce": 3.0797}, "hellaswag": {"acc_norm": 0.302}}))
    export_model(run, tmp_path / "out", "hf")  # a run folder: its final/ model
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| lr | 0.0006 |" in card and "| preset | baroni2025 |" in card
    assert "| final loss | 2.98 |" in card and "| site-freeze events | 1 |" in card
    assert "| owt.ce | 3.0797 |" in card and "| hellaswag.acc_norm | 0.302 |" in card
    assert "to_transformer_lens" in card and "to_nnsight" in card and "AutoModelForCausalLM" in card


def test_card_says_not_available_without_run_files(tmp_path, dirs):
    export_model(dirs["folded"], tmp_path / "out", "hf")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Training\n\nNot available" in card and "## Evaluation\n\nNot available" in card


def test_eot_token_is_exercised_by_parity_batches(dirs):
    from lnfree.export.core import sample_batches

    batches = sample_batches(load_norm_free(dirs["folded"]).model)
    assert any((b == EOT).any() for b in batches) and max(b.shape[1] for b in batches) == 64
