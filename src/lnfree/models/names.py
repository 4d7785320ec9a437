"""Family names, without importing a family (no torch): what the command line offers and what the papers used.
`models/families.py` checks that the registered families are exactly these."""

FAMILY_NAMES = ("gpt2", "llama", "gpt_neox")
PAPER_FAMILY = "gpt2"  # both papers removed GPT-2's norms only; the offline analogs' default family too
