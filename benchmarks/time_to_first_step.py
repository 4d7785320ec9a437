"""Time to the first optimizer step of a removal run that reads 1% of a large corpus: a sampled token cache (the
default, lnfree.data.cache) against tokenizing the whole split first (`--full-cache`), side by side.

The corpus is generated here, offline: `--documents` documents (default 1M) in parquet files of 100k (so that the
full build tokenizes files in parallel too), each a random run of lines of the Python standard library (200–2,000
characters). The model is a random 2-layer GPT-2 with the
offline demo's tokenizer. Each run is `lnfree remove` in a subprocess with its own empty cache folder, timed from
its start to its first line of metrics.jsonl (step 0 done), then stopped. Prints the times, the cache sizes and
their ratios. No assertions: this is a measurement.

    .venv/bin/python benchmarks/time_to_first_step.py [--documents 1000000] [--fraction 0.01] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH_TOKENS, MICRO, CTX = 8192, 32, 256


def make_corpus(folder: Path, n_docs: int, seed: int = 0) -> int:
    """Parquet files of `n_docs` documents cut from the stdlib's lines; returns their size in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lnfree.data import list_source_files

    lines = []
    for f in list_source_files("stdlib", "all"):
        try:
            lines += f.read_text(encoding="utf-8").splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
            continue
    rng = random.Random(seed)
    for start in range(0, n_docs, 100_000):
        docs = []
        for _ in range(min(100_000, n_docs - start)):
            i, target, doc = rng.randrange(len(lines)), rng.randint(200, 2000), []
            size = 0
            while size < target:
                doc.append(lines[i % len(lines)])
                size += len(doc[-1])
                i += 1
            docs.append("".join(doc))
        pq.write_table(pa.table({"text": docs}), folder / f"docs-{start // 100_000:03d}.parquet")
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def make_model(folder: Path) -> None:
    import transformers

    from lnfree.demo import DemoConfig, demo_cache_dir, prepare_tokenizer
    from lnfree.tokenizer import load_tokenizer

    tok = load_tokenizer(prepare_tokenizer(DemoConfig(), demo_cache_dir()))
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=CTX, n_embd=64, n_layer=2, n_head=2,
                                  eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def time_to_first_step(model: Path, data: Path, out: Path, cache: Path, steps: int, *extra: str) -> float:
    cmd = [sys.executable, "-m", "lnfree.cli", "remove", str(model), "--data", str(data), "--out", str(out),
           "--cache-dir", str(cache), "--steps", str(steps), "--batch-tokens", str(BATCH_TOKENS), "--micro-batch",
           str(MICRO), "--ctx", str(CTX), "--quiet", *extra]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    elapsed = time.time() - t0
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if not (metrics.exists() and metrics.read_text().strip()):
        raise RuntimeError(f"the run ended before its first step: {proc.stderr.read()[-2000:]}")
    return elapsed


def cache_bytes(cache: Path) -> tuple[int, int]:
    """(tokens.bin bytes, tokens) of the one training cache under `cache`."""
    (manifest,) = [p for p in cache.glob("*/manifest.json") if json.loads(p.read_text())["split"] == "train"]
    info = json.loads(manifest.read_text())
    return (manifest.parent / "tokens.bin").stat().st_size, info["token_count"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--documents", type=int, default=1_000_000)
    ap.add_argument("--fraction", type=float, default=0.01, help="share of the corpus's tokens the run reads")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="ttfs-")))
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "corpus"
    data.mkdir(exist_ok=True)
    t0 = time.time()
    size = make_corpus(data, args.documents)
    print(f"corpus: {args.documents:,} documents, {size / 1e6:,.0f} MB parquet ({time.time() - t0:.0f} s to write)")
    make_model(args.out / "model")

    full_s = time_to_first_step(args.out / "model", data, args.out / "run-full", args.out / "cache-full", 1,
                                "--full-cache")
    full_bytes, total_tokens = cache_bytes(args.out / "cache-full")
    steps = max(1, round(total_tokens * args.fraction / BATCH_TOKENS))
    sampled_s = time_to_first_step(args.out / "model", data, args.out / "run-sampled", args.out / "cache-sampled",
                                   steps)
    sampled_bytes, sampled_tokens = cache_bytes(args.out / "cache-sampled")
    print(f"run: {steps} steps × {BATCH_TOKENS} tokens = {steps * BATCH_TOKENS:,} tokens "
          f"({steps * BATCH_TOKENS / total_tokens:.1%} of the corpus's {total_tokens:,})")
    print("| cache | time to first step | cache size | tokens |\n|---|---|---|---|")
    print(f"| whole split (--full-cache) | {full_s:.1f} s | {full_bytes / 1e6:,.1f} MB | {total_tokens:,} |")
    print(f"| sampled (default) | {sampled_s:.1f} s | {sampled_bytes / 1e6:,.1f} MB | {sampled_tokens:,} |")
    print(f"ratios full / sampled: time {full_s / sampled_s:.1f}×, cache size {full_bytes / sampled_bytes:.1f}×")


if __name__ == "__main__":
    main()
