"""lnfree: remove LayerNorm from pretrained transformers by fine-tuning."""
from . import export as _export  # noqa: F401  (registers lnfree_gpt2 with transformers' Auto classes, lazily)

__version__ = "0.1.0"
