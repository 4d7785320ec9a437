"""lnfree: remove LayerNorm from pretrained transformers by fine-tuning."""
__version__ = "0.1.0"
