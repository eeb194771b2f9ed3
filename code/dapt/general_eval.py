"""General capability on lm-evaluation-harness (``lm_eval``, its HF backend), beside bits per byte.

ChipNeMo checks that DAPT keeps the base model's general ability (MMLU and reasoning benchmarks before and
after). This module runs any lm-eval task a user names (``mmlu``, ``hellaswag``, ``arc_easy`` ..., which
need the machine to reach their datasets) on an already loaded model, through lm-eval's own ``HFLM``
model class and ``simple_evaluate``.

Two local tasks run offline everywhere (CI included), so the integration is exercised for real:
``dapt_nextline_domain`` and ``dapt_nextline_general``, built from the held-out domain and general text the
evaluation already reads. Each item shows up to 8 lines of a held-out document and asks which of four lines
comes next: the true next line, or one of three lines of similar length from elsewhere in the same document
(so style, indentation and names do not give it away; other documents only when one is too short), boilerplate
found in several documents left out. lm-eval scores each choice by its log-likelihood after the context
(``acc``; ``acc_norm`` divides by the choice's length in bytes); chance is 0.25. The items are written as
JSONL and read through lm-eval's local-dataset support (a task YAML whose ``dataset_path`` is the ``json``
builder with ``data_files``), so nothing is fetched.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dapt.errors import UserInputError

LM_EVAL_VERSION = "0.4.13"  # the version pinned in requirements.txt and requirements-container.txt
LOCAL_TASKS = {"dapt_nextline_domain": "domain", "dapt_nextline_general": "general"}
CHOICES = 4
CONTEXT_LINES = 8
CONTEXT_CHARS = 600
MIN_LINE_CHARS = 16  # non-space characters of a line worth asking about (not "end", "}", blank lines)
MAX_LINE_CHARS = 160
NO_TASKS = ("none",)


class GeneralEvalError(UserInputError):
    """lm-eval is missing, a task is unknown, or the held-out text cannot make the local tasks."""


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _askable(line: str) -> bool:
    return len("".join(line.split())) >= MIN_LINE_CHARS and len(line) <= MAX_LINE_CHARS


def nextline_items(texts: Sequence[str], count: int, seed: int = 1234) -> list[dict[str, Any]]:
    """``count`` multiple-choice items "which line comes next?" from ``texts`` (deterministic for a seed).

    Each item: ``context`` (up to 8 whole lines, at most 600 characters, ending with a newline),
    ``choices`` (4 lines, no newline) and ``label`` (the index of the true next line). Items are taken
    round-robin over the documents; only lines found in a single document are asked about or offered
    (no boilerplate); distractors are lines of the same document more than 8 lines away (of other documents
    when it has too few), as close to the true line's length as possible (0.8-1.25x, else 0.5-2x), never
    equal to it.
    """
    rng = np.random.default_rng(seed)
    docs = [_lines(text) for text in texts]
    # Lines found in several documents (licence headers, boilerplate) are left out: a model that has seen them
    # often would pick such a distractor whatever the context, and an answer that is one says little.
    spread = Counter(line.strip() for lines in docs for line in {x.strip() for x in lines if _askable(x)})
    pool = [(d, i) for d, lines in enumerate(docs) for i, line in enumerate(lines)
            if _askable(line) and spread[line.strip()] == 1]
    positions = {d: [i for dd, i in pool if dd == d and i >= 1] for d in range(len(docs))}
    order = [d for d in range(len(docs)) if positions[d]]
    if not order or len(pool) < CHOICES:
        raise GeneralEvalError(
            f"the held-out text has too few lines of {MIN_LINE_CHARS}-{MAX_LINE_CHARS} characters to build "
            f"{count} next-line questions; give more held-out documents or pass --lm-eval-tasks none."
        )
    pool_lengths = np.array([len(docs[d][i]) for d, i in pool])
    items: list[dict[str, Any]] = []
    used: set[tuple[int, int]] = set()
    rounds = 0
    while len(items) < count and rounds < count * 4:
        doc = order[rounds % len(order)]
        rounds += 1
        free = [i for i in positions[doc] if (doc, i) not in used]
        if not free:
            continue
        target = int(rng.choice(free))
        used.add((doc, target))
        items.append(_item(docs, doc, target, pool, pool_lengths, rng))
    return items


def _item(docs: list[list[str]], doc: int, target: int, pool: list[tuple[int, int]], pool_lengths: np.ndarray,
          rng: np.random.Generator) -> dict[str, Any]:
    lines = docs[doc]
    context_lines = lines[max(0, target - CONTEXT_LINES):target]
    while len(context_lines) > 1 and sum(len(line) + 1 for line in context_lines) > CONTEXT_CHARS:
        context_lines = context_lines[1:]
    context = "\n".join(context_lines)[-CONTEXT_CHARS:] + "\n"
    answer = lines[target]
    length = len(answer)

    def same_document_far(k: int) -> bool:
        d, i = pool[k]
        return d == doc and abs(i - target) > CONTEXT_LINES and docs[d][i].strip() != answer.strip()

    def other_document(k: int) -> bool:
        d, i = pool[k]
        return d != doc and docs[d][i].strip() != answer.strip()

    candidates: list[int] = []
    # Lines of the same document far from the question first (same style, indentation and names: only the
    # context tells them apart), then of other documents; as close in length as the pool allows.
    for allowed in (same_document_far, other_document):
        for low, high in ((0.8, 1.25), (0.5, 2.0), (0.0, float("inf"))):
            candidates = [k for k in np.flatnonzero((pool_lengths >= length * low) &
                                                    (pool_lengths <= length * high)) if allowed(k)]
            if len(candidates) >= CHOICES - 1:
                break
        if len(candidates) >= CHOICES - 1:
            break
    distractors: list[str] = []
    for k in rng.permutation(candidates):
        line = docs[pool[k][0]][pool[k][1]]
        if line.strip() not in {c.strip() for c in distractors}:
            distractors.append(line)
        if len(distractors) == CHOICES - 1:
            break
    choices = distractors + [answer]
    order = rng.permutation(len(choices))
    return {"context": context, "choices": [choices[j] for j in order],
            "label": int(np.flatnonzero(order == len(choices) - 1)[0])}


def task_config(name: str, data_file: Path, cache_dir: Path) -> dict[str, Any]:
    """The lm-eval task definition of a local multiple-choice task read from ``data_file`` (JSONL)."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_local_tasks(folder: Path, texts: dict[str, Sequence[str]], count: int, seed: int = 1234) -> dict[str, Path]:
    """Write the local tasks' JSONL items and task YAMLs into ``folder``; return task name -> JSONL file."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, dataset in LOCAL_TASKS.items():
        items = nextline_items(texts[dataset], count, seed)
        data_file = folder / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items),
                             encoding="utf-8")
        (folder / f"{name}.yaml").write_text(
            yaml.safe_dump(task_config(name, data_file.absolute(), (folder / "datasets_cache").absolute())),
            encoding="utf-8")
        files[name] = data_file
    return files


def requested_tasks(tasks: Sequence[str]) -> list[str]:
    """The task names to run (``none`` or nothing: no lm-eval step)."""
    names = [t for t in tasks if t]
    if not names or [t.lower() for t in names] == list(NO_TASKS):
        return []
    if len(set(names)) != len(names):
        raise GeneralEvalError(f"--lm-eval-tasks repeats a task: {list(names)}.")
    return names


def import_lm_eval() -> Any:
    """The lm_eval package, or a clear refusal when it is not installed."""
    try:
        import lm_eval
    except ImportError:
        raise GeneralEvalError(
            f"the general-capability step needs lm-evaluation-harness: pip install 'lm-eval[hf]=={LM_EVAL_VERSION}' "
            "(it is in requirements.txt and requirements-container.txt), or pass --lm-eval-tasks none to skip it."
        ) from None
    return lm_eval


def task_manager(include_paths: Sequence[Path], tasks: Sequence[str]) -> Any:
    """lm-eval's TaskManager over its own tasks and ``include_paths``; unknown task names are refused."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(path) for path in include_paths] or None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise GeneralEvalError(
            f"--lm-eval-tasks: lm-eval {LM_EVAL_VERSION} knows no task {unknown}; run `lm_eval ls tasks` "
            "for the list (for example mmlu, hellaswag, arc_easy, arc_challenge, winogrande, piqa, boolq)."
        )
    return manager


def headline(result: dict[str, Any]) -> tuple[str, float | None, float | None]:
    """The metric shown in the table for one task: acc_norm where the task has it, else acc, else the first."""
    values = {key.split(",")[0]: value for key, value in result.items()
              if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    for metric in ("acc_norm", "acc", *values):
        if metric in values:
            stderr = next((v for k, v in result.items() if k.split(",")[0] == f"{metric}_stderr"), None)
            return metric, float(values[metric]), float(stderr) if isinstance(stderr, (int, float)) else None
    return "none", None, None


# lm-eval's modules that draw console progress bars (``from tqdm import tqdm``); in a notebook each refresh of
# those becomes an output of its own (hundreds per model), so they draw tqdm.auto's widget bars there instead.
_LM_EVAL_PROGRESS_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def _auto_progress_bars() -> Iterator[None]:
    """While lm-eval runs, its progress bars are tqdm.auto's: widgets in Jupyter, the console bar elsewhere."""
    import importlib

    from tqdm.auto import tqdm as auto_tqdm

    swapped = []
    for name in _LM_EVAL_PROGRESS_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "tqdm"):
            swapped.append((module, module.tqdm))
            module.tqdm = auto_tqdm
    try:
        yield
    finally:
        for module, original in swapped:
            module.tqdm = original


def run_tasks(model: Any, tokenizer: Any, tasks: Sequence[str], manager: Any, *, limit: int | None,
              num_fewshot: int | None, batch_size: int, max_length: int | None) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on a loaded HF causal LM and its HF tokenizer; per task: headline and all metrics."""
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    quiet = logging.getLogger("lm_eval")  # per-request truncation notes, the "model passed as an object" note
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with _auto_progress_bars():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                      max_length=max_length, add_bos_token=True)
            output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                             task_manager=manager, log_samples=False)
    finally:
        quiet.setLevel(level)
    results = {}
    for task in tasks:
        raw = output["results"].get(task, {})
        metric, value, stderr = headline(raw)
        results[task] = {"metric": metric, "value": value, "stderr": stderr,
                         "samples": (output.get("n-samples", {}).get(task) or {}).get("effective"),
                         "all": {k: v for k, v in raw.items() if isinstance(v, (int, float, str))}}
    return results
