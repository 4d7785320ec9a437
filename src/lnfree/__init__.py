"""lnfree: remove LayerNorm from pretrained transformers by fine-tuning."""
from . import export as _export  # noqa: F401  (registers the norm-free classes with transformers' Auto classes, lazily)

__version__ = "0.1.0"
