"""Commands that hand a model on: `export` (a parity-checked transformers checkpoint, optionally pushed to the hub)
and `verify` (proof that a model is LN-free: structure, exact direct logit attribution, export round trips)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an LN-free model as a parity-checked transformers checkpoint")
    p.add_argument("source", help="folded model, published eps=1e12 model, run folder, or any model folder")
    p.add_argument("--out", required=True, type=Path, help="export folder (written atomically)")
    p.add_argument("--format", default="hf", choices=("hf", "hf-compat"), dest="fmt",
                   help="hf: the norm-free class (LNFree<Arch>, no norms); hf-compat: the stock class, eps=1e12")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the export to this hub repo")
    p.add_argument("--allow-partial", action="store_true",
                   help="export an unfinished run's newest checkpoint (the card says so)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier lnfree export in --out (only once the new one passed its parity check)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from ..export.core import export_model

    result = export_model(args.source, args.out, args.fmt, push_to_hub=args.push_to_hub,
                          allow_partial=args.allow_partial, overwrite=args.overwrite)
    parity = ", ".join(f"{k} {v:.1e}" for k, v in result.parity.items())
    fp32 = ", ".join(f"{k} {v:.1e}" for k, v in result.parity_fp32.items())
    print(f"wrote {result.path} ({result.format}); reload parity, max-abs logits: {parity} in float64 "
          f"(gate ≤ {result.gate:.1e}); {fp32} in float32")
    if args.push_to_hub:
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return 0


def add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a model is LN-free: structure, exact DLA, export parity")
    p.add_argument("model", help="model folder, run folder or hub id")
    p.add_argument("--no-exports", action="store_true", help="skip the export round trips")
    p.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from ..export.verify import verify

    report = verify(args.model, exports=not args.no_exports)
    print("\n".join(report.figures()))
    for failure in report.failures:
        print(f"FAIL: {failure}")
    print("PASS: no normalization; direct logit attribution exact; exports reload with parity"
          if report.passed else f"verify failed for {args.model}")
    return 0 if report.passed else 1
