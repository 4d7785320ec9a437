"""Exports and interop for LN-free models: transformers (`hf`, `hf-compat`), TransformerLens, nnsight, `verify`.

Importing this package is cheap: it imports neither torch nor transformers. It does one thing at import
time — it makes sure transformers' Auto classes know the `lnfree_gpt2` model type (see `hf.py` for why this
is done from `import lnfree` and not from a checkpoint's remote code):
  * if transformers' Auto machinery is already loaded, `lnfree.export.hf` is imported now (it registers);
  * otherwise a post-import hook waits until transformers has *finished* loading its Auto classes and then
    imports it. "Finished" matters: registering from inside transformers' own import chain would import
    its modelling code while `transformers.modeling_utils` is half initialised.
The public functions below are imported lazily, on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings
from typing import Any

# `verify` is deliberately absent: the submodule of that name would shadow a lazily exported function once
# imported. Use `from lnfree.export.verify import verify`.
__all__ = ["FORMATS", "PARITY_TOL", "VerifyReport", "export_model", "load_norm_free", "to_nnsight",
           "to_transformer_lens"]

_LAZY = {"FORMATS": "core", "PARITY_TOL": "core", "export_model": "core", "load_norm_free": "core",
         "VerifyReport": "verify", "to_transformer_lens": "transformer_lens",
         "to_nnsight": "nnsight"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- registration with transformers' Auto classes -------------------------------------------------------------
_TRIGGER = "transformers.models.auto.configuration_auto"  # AutoConfig's table; AutoModel* import it too
_HF_MODULE = f"{__name__}.hf"


def _is_transformers(name: str) -> bool:
    return name == "transformers" or name.startswith("transformers.")


def _transformers_quiescent(except_name: str | None = None) -> bool:
    """True when no transformers module (other than `except_name`) is still executing its import."""
    for name, module in list(sys.modules.items()):
        if name != except_name and _is_transformers(name):
            if getattr(getattr(module, "__spec__", None), "_initializing", False):
                return False
    return True


def _register() -> None:
    try:
        importlib.import_module(_HF_MODULE)  # registers at the end of its import
    except Exception as e:  # never break the user's transformers import because of us
        warnings.warn(f"lnfree could not register its norm-free classes with transformers: {e}", stacklevel=2)


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Wraps each transformers module's loader; once the Auto tables exist and nothing transformers is
    mid-import, removes itself and registers."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if not _is_transformers(name):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            original = loader.exec_module

            def exec_module(module: Any) -> None:
                original(module)
                self.after_load(name)

            loader.exec_module = exec_module  # this loader object serves only this one spec
        return spec

    def after_load(self, name: str) -> None:
        if self in sys.meta_path and _TRIGGER in sys.modules and _transformers_quiescent(except_name=name):
            sys.meta_path.remove(self)
            _register()


def _install() -> None:
    if _HF_MODULE in sys.modules or any(isinstance(f, _RegisterWhenTransformersLoads) for f in sys.meta_path):
        return
    if _TRIGGER in sys.modules and _transformers_quiescent():
        _register()
    else:
        sys.meta_path.insert(0, _RegisterWhenTransformersLoads())


_install()
