"""Benchmarks (HellaSwag, PIQA, WinoGrande, BoolQ, LAMBADA …) through lm-evaluation-harness.

Why a wrapper and not an export: lm-eval's `HFLM` does everything that decides a benchmark score — prompt
building, context/continuation tokenization, left truncation, batching, acc / acc_norm — and only needs a
causal LM object that maps ids to `.logits`. We hand it our own model behind a thin adapter
(`_CausalLMAdapter`), so every state of a model is scored exactly as it computes: the original GPT-2, a model
mid-removal with frozen σ̂ sites (which no `transformers` class can express), a published eps=1e12 model (read
as exactly frozen rather than approximately), and a folded norm-free model — without depending on a
`transformers` registration of `LNFreeGPT2LMHeadModel`. Scores equal HFLM's on the same `transformers` model
(see tests). Nothing about the tasks is re-implemented here.

Offline: the stock tasks download their data from the hub. Local copies run through a task YAML with
`dataset_path: json` (see tests/fixtures/hellaswag_local), found via `include_path`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

# Short names → lm-eval task names. Any other lm-eval task name (or a local one) passes through unchanged.
TASK_ALIASES = {"hellaswag": "hellaswag", "piqa": "piqa", "winogrande": "winogrande", "boolq": "boolq",
                "lambada": "lambada_openai"}
METRICS = ("acc", "acc_norm", "perplexity")


class _CausalLMAdapter(nn.Module):
    """Our model as the minimal `transformers`-like causal LM that HFLM calls: `model(ids).logits`."""

    def __init__(self, model: nn.Module, max_length: int):
        super().__init__()
        self.inner = model
        # HFLM reads the context length (n_positions) and, for a pad-token fallback, model_type.
        self.config = SimpleNamespace(n_positions=max_length, vocab_size=model.vocab_size,
                                      model_type=getattr(model, "family", "lnfree"), _name_or_path="lnfree")
        self.name_or_path = str(getattr(model, "source", "lnfree"))

    @property
    def device(self) -> torch.device:
        return next(self.inner.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.inner.parameters()).dtype

    def tie_weights(self) -> None:
        """HFLM calls this on `transformers` models; ours tie (or not) by construction."""

    def forward(self, input_ids: Tensor, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self.inner(input_ids))


def resolve_tasks(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ValueError("no benchmark task given; e.g. --tasks hellaswag,piqa")
    return [TASK_ALIASES.get(n.lower(), n) for n in names]


def _load(model_dir_or_model: Any, tokenizer: Any) -> tuple[nn.Module, Any]:
    """(our model, tokenizer) from a folder / run folder / hub id, or from a model object plus a tokenizer."""
    from ..tokenizer import load_tokenizer

    if isinstance(model_dir_or_model, nn.Module):
        if tokenizer is None:
            raise ValueError("a model object needs tokenizer= (a folder, hub id or tokenizer object)")
        model = model_dir_or_model
    else:
        from ..sources import load_source

        model, where = load_source(model_dir_or_model)
        tokenizer = where.model_dir if tokenizer is None else tokenizer
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(Path(tokenizer) if Path(tokenizer).exists() else str(tokenizer))
    if len(tokenizer) > model.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{model.vocab_size}; use the model's own tokenizer")
    return model, tokenizer


def make_lm(model_dir_or_model: Any, tokenizer: Any = None, *, batch_size: int | str = 8,
            device: str | None = None, dtype: str = "fp32", max_length: int | None = None):
    """An lm-eval `HFLM` that runs our model (fp32, or bf16 autocast via HFLM's mixed precision); batch_size
    "auto" lets lm-eval find the largest that fits."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = _load(model_dir_or_model, tokenizer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    adapter = _CausalLMAdapter(model, max_length or model.context_length)
    with _quiet_lm_eval():
        return HFLM(pretrained=adapter, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                    device=device, mixed_precision_dtype="bfloat16" if dtype == "bf16" else None)


def run_benchmarks(model_dir_or_model: Any, tasks: str | list[str], limit: int | float | None = None,
                   include_path: str | os.PathLike | None = None, *, tokenizer: Any = None,
                   batch_size: int | str = 8, device: str | None = None, dtype: str = "fp32",
                   num_fewshot: int | None = None, log_samples: bool = False,
                   output_path: str | os.PathLike | None = None,
                   bootstrap_iters: int = 100_000) -> dict[str, dict[str, float]]:
    """Score a model on lm-eval tasks (zero-shot by default) → {task: {"acc": …, "acc_stderr": …, "acc_norm": …,
    "n": …}}, standard errors as lm-eval computes them (closed form for acc; `bootstrap_iters` 0 skips them).

    `limit` caps the examples per task (for smoke tests; published numbers use every example). `output_path`
    writes lm-eval's own results file (and, with `log_samples`, one samples file per task) as its CLI does.
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    names = resolve_tasks(tasks)
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    task_manager = get_task_manager(include_path)
    unknown = [n for n in names if n not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; e.g. {', '.join(TASK_ALIASES)}"
                         + ("" if include_path else ", or a local task via --include-path"))
    lm = make_lm(model_dir_or_model, tokenizer, batch_size=batch_size, device=device, dtype=dtype)
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path else None
    try:
        with _quiet_lm_eval():
            out = simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot,
                                  task_manager=task_manager, log_samples=log_samples,
                                  bootstrap_iters=bootstrap_iters, evaluation_tracker=tracker)
            if tracker is not None:  # what `lm_eval --output_path [--log_samples]` writes
                samples = out.pop("samples", None) if log_samples else None
                tracker.save_results_aggregated(results=out, samples=samples)
                for task in out["configs"] if samples else []:
                    tracker.save_results_samples(task_name=task, samples=samples[task])
    except (ConnectionError, OSError, FileNotFoundError) as e:
        raise ValueError(f"lm-eval could not load the data of {', '.join(names)} ({type(e).__name__}; offline?); "
                         "give a local task with --include-path") from e
    return _scores(out, names)


def get_task_manager(include_path: str | os.PathLike | None = None):
    """lm-eval's task index (with the tasks under `include_path`), built once per path: it reads every
    stock task YAML, which takes seconds."""
    return _task_manager(str(Path(include_path).resolve()) if include_path else None)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        return TaskManager(include_path=include_path)


def _scores(out: dict[str, Any], names: list[str]) -> dict[str, dict[str, float]]:
    """lm-eval's "acc,none" / "acc_stderr,none" keys → plain metric names, per task (groups included as
    reported); a stderr lm-eval did not compute ("N/A") is left out."""
    scores = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            known = metric in METRICS or (metric.endswith("_stderr") and metric[: -len("_stderr")] in METRICS)
            if known and filt in ("none", "") and isinstance(value, int | float):
                row[metric] = float(value)
        n = out.get("n-samples", {}).get(task, {})
        if n:
            row["n"] = int(n.get("effective", n.get("original", 0)))
        if row:
            scores[task] = row
    missing = [n for n in names if n not in scores]
    if missing:
        raise ValueError(f"lm-eval returned no acc/acc_norm for {', '.join(missing)}")
    return scores


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every task and request at INFO/WARNING; keep the console to our progress and errors."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---- lm-eval's own command line -----------------------------------------------------------------------------
def register_lm_eval_model() -> None:
    """Make `lnfree` an lm-eval model name: `--model lnfree --model_args pretrained=PATH[,dtype=bf16]` scores
    anything lnfree reads — a run folder, a checkpoint mid-removal, a published eps=1e12 model, a folded one —
    through the same adapter as `lnfree eval --tasks`."""
    import lm_eval.models  # noqa: F401  (the stock models first: lm-eval loads them only into an empty registry)
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
    from lm_eval.models.huggingface import HFLM

    if "lnfree" in MODEL_REGISTRY:
        return

    @register_model("lnfree")
    class LNFreeLM(HFLM):
        def __init__(self, pretrained: str, tokenizer: str | None = None, dtype: str = "fp32",
                     max_length: int | None = None, device: str | None = None, **kwargs: Any):
            model, tok = _load(pretrained, tokenizer)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model.to(device).eval()
            kwargs.pop("backend", None)
            super().__init__(pretrained=_CausalLMAdapter(model, max_length or model.context_length), tokenizer=tok,
                             backend="causal", device=device,
                             mixed_precision_dtype="bfloat16" if dtype == "bf16" else None, **kwargs)


def lm_eval_main() -> None:
    """`lnfree-lm-eval`: lm-eval's own command line, with lnfree's models known to it — `--model lnfree` (see
    `register_lm_eval_model`) and, through `--model hf`, the `hf` exports (their LNFree* classes registered with
    transformers' Auto classes by `import lnfree`). The `hf-compat` exports need neither: stock `lm_eval` loads
    them."""
    import lnfree  # noqa: F401

    register_lm_eval_model()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
