"""Bits per byte of several models on held-out domain and general text.

Bits per byte divides a document's total negative log-likelihood (in bits) by its
UTF-8 size, so models with different tokenizers are compared on the same footing
(per-token perplexity rewards a tokenizer that cuts text into more, easier pieces).

Definition used throughout the project (``../shared/notes/cpu-dapt-facts.md``): each
document is encoded with the model folder's own SentencePiece model as
``[BOS] + tokens`` (no EOS); every token after BOS is scored, the first one
included; the sequence is cut into windows of the model's maximum length whose
scored tokens do not overlap (a window starts with the last token of the one
before, as context only), so every token is scored exactly once; the total NLL in
bits is divided by the document's UTF-8 bytes. (With this rule the converted
stories260K scores 9.29 / 3.95 bits per byte on ../shared's domain / general
held-out data, the reference values.)

Device and precision (:func:`select_placement`, the one place that decides them): float32 on CPU, exactly
as before (same batches, same numbers bit for bit); on CUDA every visible GPU is usable: the model goes
on one GPU when it fits, else accelerate splits it across all of them (``device_map="auto"``), in bf16
where the GPU supports it (float16 otherwise). Batches are bounded by windows (CPU: 8) and by padded
tokens (CUDA: 16,384); a progress bar counts tokens, and the report gives tokens per second.

Beside bits per byte, lm-evaluation-harness tasks (:mod:`dapt.general_eval`) measure general capability:
two local next-line tasks built from the held-out text by default, and any lm-eval task a user names.

Why one module (about 600 lines): the definition above, the windows and batches that implement it, and the
placement that must not change its numbers are checked against each other; reading them apart hides that.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from dapt.artifacts import file_sha256, read_manifest, stage_output, write_json
from dapt.config import DEFAULT_OUTPUTS, param
from dapt.corpus import DEFAULT_HELDOUT, load_corpus
from dapt.device import Capabilities, detect_capabilities, dtype_argument
from dapt.errors import UserInputError

DATASETS = ("domain", "general")
CPU_BATCH_WINDOWS = 8
CUDA_BATCH_TOKENS = 16384
GIB = 1 << 30


class EvaluateInputError(UserInputError):
    """A model folder or held-out corpus cannot be evaluated; the message says what to do."""


@dataclass
class EvaluateConfig:
    """Parameters of ``python -m dapt evaluate``."""

    models: tuple[Path, ...] = param(
        (DEFAULT_OUTPUTS / "tiny" / "base_model", DEFAULT_OUTPUTS / "tiny" / "extended_model",
         DEFAULT_OUTPUTS / "tiny" / "dapt_model"),
        "HF model folders to compare, each with its own tokenizer.model",
    )
    labels: tuple[str, ...] = param((), "one display name per model; None: the folder names")
    domain_heldout: Path = param(DEFAULT_HELDOUT / "domain", "held-out domain JSONL file or folder")
    general_heldout: Path = param(DEFAULT_HELDOUT / "general", "held-out general JSONL file or folder")
    output: Path = param(DEFAULT_OUTPUTS / "tiny" / "evaluation", "output folder (table, JSON, plot)")
    text_keys: tuple[str, ...] = param(("text",), "JSON keys that may hold a record's text")
    max_documents: int | None = param(None, "score only the first N documents of each held-out set")
    max_length: int | None = param(None, "window length; None: the model's max_position_embeddings")
    batch_size: int | None = param(None, f"windows per forward pass at most; None: {CPU_BATCH_WINDOWS} on "
                                         "CPU, no limit on CUDA")
    batch_tokens: int | None = param(None, "padded tokens per forward pass at most; None: no limit on CPU, "
                                           f"{CUDA_BATCH_TOKENS} on CUDA")
    device: Literal["auto", "cpu", "cuda"] = param("auto", "auto: every visible CUDA GPU when there is one, else CPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = param(
        "auto", "auto: float32 on CPU; bfloat16 on GPUs that support it, else float16")
    threads: int | None = param(None, "torch CPU threads; None: torch's choice")
    lm_eval_tasks: tuple[str, ...] = param(
        ("dapt_nextline_domain", "dapt_nextline_general"),
        "lm-evaluation-harness tasks for general capability (e.g. mmlu hellaswag arc_easy; those need their "
        "datasets); the two dapt_nextline tasks are built offline from the held-out text; none: skip")
    lm_eval_limit: int | None = param(None, "score only the first N examples of each lm-eval task")
    lm_eval_fewshot: int | None = param(None, "few-shot examples per lm-eval prompt; None: the task's own")
    lm_eval_batch_size: int = param(16, "lm-eval requests per forward pass")
    lm_eval_items: int = param(100, "questions in each local dapt_nextline task")
    lm_eval_include: Path | None = param(None, "folder of further lm-eval task YAMLs (your own local tasks)")


def validate_config(config: EvaluateConfig) -> None:
    """Refuse numbers that cannot work, with the user's value (nothing is replaced by a default)."""
    at_least = {"max_documents": 1, "max_length": 2, "batch_size": 1, "batch_tokens": 2, "threads": 1,
                "lm_eval_limit": 1, "lm_eval_fewshot": 0, "lm_eval_batch_size": 1, "lm_eval_items": 1}
    for name, low in at_least.items():
        value = getattr(config, name)
        if value is not None and value < low:
            raise EvaluateInputError(f"--{name.replace('_', '-')} must be at least {low} (got {value}).")


# --- device and precision ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where and in which precision a model is evaluated."""

    device: str  # "cpu" or "cuda"
    dtype: str  # "float32", "bfloat16" or "float16"
    device_map: str | None  # None: the whole model on one device; "auto": accelerate splits it over the GPUs
    gpus: int  # CUDA GPUs visible
    reason: str


def choose_placement(device: str, dtype: str, *, cuda_gpus: int, bf16_supported: bool,
                     model_bytes: int | None = None, gpu_free_bytes: Sequence[int] = (),
                     reserve_bytes: int = 2 * GIB) -> Placement:
    """Decide device, precision and model split from the facts of the machine (a pure function).

    ``model_bytes``: the weights' size in the chosen precision; with ``gpu_free_bytes`` of GPU 0 and the
    activation ``reserve_bytes`` it decides whether the model fits one GPU or is split over all of them.
    """
    if device == "cpu" or (device == "auto" and cuda_gpus == 0):
        chosen = "float32" if dtype == "auto" else dtype
        why = "no CUDA GPU visible" if device == "auto" else "--device cpu"
        return Placement("cpu", chosen, None, cuda_gpus, f"CPU ({why}), {chosen}")
    if cuda_gpus == 0:
        raise EvaluateInputError("--device cuda, but no CUDA GPU is visible (torch.cuda.is_available() is False); "
                                 "pass --device auto or cpu.")
    if dtype == "bfloat16" and not bf16_supported:
        raise EvaluateInputError("--dtype bfloat16, but this GPU does not support bf16; pass --dtype float16 or "
                                 "float32 (or auto).")
    chosen = dtype if dtype != "auto" else ("bfloat16" if bf16_supported else "float16")
    fits = model_bytes is None or not gpu_free_bytes or model_bytes + reserve_bytes <= gpu_free_bytes[0]
    if fits:
        return Placement("cuda", chosen, None, cuda_gpus, f"CUDA, one GPU of {cuda_gpus} (the model fits), {chosen}")
    spread = f"split over {cuda_gpus} GPUs" if cuda_gpus > 1 else "on one GPU with CPU offload (slow)"
    return Placement("cuda", chosen, "auto", cuda_gpus,
                     f"CUDA, {spread}: {model_bytes / GIB:.1f} GiB of weights do not fit one GPU, {chosen}")


def parameter_count(folder: Path) -> int | None:
    """Parameters stored in a folder's safetensors files (read from their headers), or None without any."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def select_placement(device: str = "auto", dtype: str = "auto", folder: Path | None = None,
                     batch_tokens: int = CUDA_BATCH_TOKENS, vocab_size: int = 32000) -> Placement:
    """The placement for the model in ``folder`` on this machine (CUDA facts read from torch)."""
    import torch

    found = detect_capabilities() if device != "cpu" else Capabilities()
    gpus, bf16 = len(found.gpu_names), found.bf16
    free = [torch.cuda.mem_get_info(i)[0] for i in range(gpus)]
    params = parameter_count(folder) if folder is not None and gpus else None
    itemsize = 4 if dtype == "float32" else 2
    # logits of one batch in the model's precision, their float32 copy and the loss's softmax
    reserve = GIB + batch_tokens * vocab_size * (itemsize + 8)
    return choose_placement(device, dtype, cuda_gpus=gpus, bf16_supported=bf16,
                            model_bytes=params * itemsize if params else None, gpu_free_bytes=free,
                            reserve_bytes=reserve)


def load_model(folder: Path, placement: Placement, reserve_bytes: int = 2 * GIB) -> Any:
    """An HF causal LM (SDPA attention) placed and cast as ``placement`` says."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, placement.dtype)
    if placement.device == "cpu":
        model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa")
        return model.to(torch_dtype)
    if placement.device_map is None:
        device_map: Any = {"": 0}
        max_memory = None
    else:
        from accelerate.utils import get_max_memory

        device_map = placement.device_map
        max_memory = get_max_memory()  # every GPU and the CPU (for offload when even all GPUs are too small)
        max_memory.update({i: max(0, torch.cuda.mem_get_info(i)[0] - reserve_bytes) for i in range(placement.gpus)})
    return AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa", device_map=device_map,
                                                max_memory=max_memory, **dtype_argument(torch_dtype))


# --- scoring -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """Totals of one model on one set of documents, and how long scoring took."""

    nll_bits: float
    num_bytes: int
    num_tokens: int
    num_documents: int
    seconds: float = 0.0

    @property
    def bits_per_byte(self) -> float:
        return self.nll_bits / self.num_bytes

    @property
    def tokens_per_byte(self) -> float:
        return self.num_tokens / self.num_bytes

    @property
    def tokens_per_second(self) -> float | None:
        return self.num_tokens / self.seconds if self.seconds > 0 else None


def _windows(ids: list[int], max_length: int) -> list[list[int]]:
    """Windows of at most ``max_length`` tokens, each starting at the previous one's last token.

    Every token but the first (BOS) is a prediction target in exactly one window.
    """
    if max_length < 2:
        raise EvaluateInputError(f"--max-length must be at least 2 (got {max_length}).")
    return [ids[start:start + max_length] for start in range(0, len(ids) - 1, max_length - 1)]


def batches(windows: list[list[int]], max_rows: int | None, max_tokens: int | None) -> Iterator[list[list[int]]]:
    """Consecutive groups of ``windows`` (sorted longest first) of at most ``max_rows`` rows and at most
    ``max_tokens`` padded tokens (rows x the first window's length; a window longer than that goes alone)."""
    batch: list[list[int]] = []
    for window in windows:
        width = len(batch[0]) if batch else len(window)
        full = bool(batch) and ((max_rows is not None and len(batch) >= max_rows)
                                or (max_tokens is not None and (len(batch) + 1) * width > max_tokens))
        if full:
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def _input_device(model: Any) -> Any:
    return model.get_input_embeddings().weight.device


def score_windows(model: Any, windows: list[list[int]], max_rows: int | None = CPU_BATCH_WINDOWS,
                  max_tokens: int | None = None, progress: str | None = None) -> float:
    """Total NLL (nats) of every window's tokens after its first, under ``model``; longest windows first.

    Right padding is harmless under causal attention and is not scored.
    """
    import numpy as np
    import torch

    windows = sorted(windows, key=len, reverse=True)
    device = _input_device(model)
    total_nats = 0.0
    model.eval()
    with torch.no_grad(), tqdm(total=sum(len(w) - 1 for w in windows), desc=progress, unit="tok",
                               unit_scale=True, disable=progress is None, leave=False) as bar:
        for batch in batches(windows, max_rows, max_tokens):
            width = len(batch[0])
            rows = np.zeros((len(batch), width), dtype=np.int64)
            scored = torch.zeros((len(batch), width - 1), dtype=torch.bool)
            for row, window in enumerate(batch):
                rows[row, :len(window)] = window
                scored[row, :len(window) - 1] = True
            tokens = torch.from_numpy(rows).to(device)
            logits = model(input_ids=tokens).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].to(logits.device).reshape(-1),
                reduction="none",
            ).reshape(scored.shape)
            total_nats += float(nll[scored.to(nll.device)].double().sum())
            bar.update(int(scored.sum()))
    return total_nats


def score_texts(model: Any, sp: Any, texts: Iterable[str], max_length: int | None = None,
                batch_size: int | None = CPU_BATCH_WINDOWS, progress: str | None = None,
                batch_tokens: int | None = None) -> Score:
    """Total NLL (bits), UTF-8 bytes and tokens of ``texts`` under ``model`` with tokenizer ``sp``.

    ``sp`` is a ``sentencepiece.SentencePieceProcessor``; windows of equal-ish length are batched,
    at most ``batch_size`` windows and ``batch_tokens`` padded tokens per forward pass.
    """
    if max_length is None:
        max_length = int(model.config.max_position_embeddings)
    windows, num_bytes, num_tokens, num_docs = [], 0, 0, 0
    for text in texts:
        if not text:
            continue
        ids = [sp.bos_id()] + sp.encode(text)
        windows.extend(_windows(ids, max_length))
        num_bytes += len(text.encode("utf-8"))
        num_tokens += len(ids) - 1
        num_docs += 1
    if num_bytes == 0:
        raise EvaluateInputError("no non-empty documents to score.")
    start = time.perf_counter()
    total_nats = score_windows(model, windows, batch_size, batch_tokens, progress)
    return Score(nll_bits=total_nats / math.log(2), num_bytes=num_bytes, num_tokens=num_tokens,
                 num_documents=num_docs, seconds=time.perf_counter() - start)


def bits_per_byte(model: Any, sp: Any, texts: Sequence[str], max_length: int | None = None) -> float:
    """Bits per UTF-8 byte of ``texts`` under an HF causal LM and its SentencePiece processor ``sp``."""
    return score_texts(model, sp, texts, max_length=max_length).bits_per_byte


# --- model folders -------------------------------------------------------------------------------------


def claimed_tokenizer_sha256(manifest: dict[str, Any] | None) -> str | None:
    """The SHA-256 of the tokenizer.model that the stage which wrote a model folder says it put there."""
    if not manifest:
        return None
    inputs = manifest.get("inputs") or {}
    if manifest.get("stage") == "train":
        return (inputs.get("model") or {}).get("tokenizer_sha256")
    if manifest.get("stage") in ("embeddings", "base-model", "export"):
        return (inputs.get("tokenizer") or {}).get("sha256")
    return None


def check_folder(folder: Path) -> str:
    """The sha256 of a model folder's tokenizer.model; refuse a folder whose tokenizer is not what it claims."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise EvaluateInputError(f"model folder {folder} has no config.json; pass an HF checkpoint folder.")
    if not (folder / "tokenizer.model").is_file():
        raise EvaluateInputError(
            f"model folder {folder} has no tokenizer.model; each model is scored with its own tokenizer."
        )
    sha = file_sha256(folder / "tokenizer.model")
    manifest = read_manifest(folder)
    claimed = claimed_tokenizer_sha256(manifest)
    if claimed is not None and claimed != sha:
        raise EvaluateInputError(
            f"{folder}/tokenizer.model (sha256 {sha[:12]}...) is not the tokenizer that `python -m dapt "
            f"{manifest['stage']}` wrote there (sha256 {claimed[:12]}...): the folder mixes artifacts of two runs. "
            f"Rerun `python -m dapt {manifest['stage']}` for it."
        )
    return sha


def check_not_stale(folders: dict[str, Path], tokenizers: dict[str, str]) -> None:
    """Refuse a model trained from another evaluated folder that has since got another tokenizer.

    The table would otherwise put results of an earlier tokenizer (a stale ``dapt_model``) beside the new one.
    """
    by_path = {Path(folder).resolve(): label for label, folder in folders.items()}
    for label, folder in folders.items():
        manifest = read_manifest(folder) or {}
        inputs = manifest.get("inputs") or {}
        if manifest.get("stage") == "train":
            source, recorded = (inputs.get("model") or {}).get("path"), (inputs.get("model") or {}).get(
                "tokenizer_sha256")
        elif manifest.get("stage") == "embeddings":
            source = (inputs.get("base_model") or {}).get("path")
            base_tokenizer = inputs.get("base_tokenizer") or {}
            inside = source and Path(base_tokenizer.get("path", "")).resolve() == (Path(source) / "tokenizer.model"
                                                                                   ).resolve()
            recorded = base_tokenizer.get("sha256") if inside else None
        else:
            continue
        source_label = by_path.get(Path(source).resolve()) if source else None
        if source_label is None or recorded is None or tokenizers[source_label] == recorded:
            continue
        raise EvaluateInputError(
            f"{label} ({folder}) was made by `python -m dapt {manifest['stage']}` from {source_label} ({source}) "
            f"when that folder had tokenizer sha256 {recorded[:12]}...; it now has {tokenizers[source_label][:12]}... "
            f"(an earlier stage was rerun). Rerun `python -m dapt {manifest['stage']}` so that the table does not "
            "mix tokenizers."
        )


def load_sentencepiece(folder: Path, model: Any) -> Any:
    """The SentencePiece processor of a model folder, refused when it has more pieces than the model rows."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(folder) / "tokenizer.model"))
    rows = model.get_input_embeddings().num_embeddings
    if sp.get_piece_size() > rows:
        raise EvaluateInputError(
            f"{folder}/tokenizer.model has {sp.get_piece_size()} pieces but the model only {rows} embedding "
            "rows; the tokenizer belongs to another model (extend it with `python -m dapt embeddings`)."
        )
    return sp


def load_model_and_tokenizer(folder: Path, placement: Placement | None = None) -> tuple[Any, Any]:
    """An HF causal LM (float32 on CPU unless ``placement`` says otherwise) and its folder's SentencePiece."""
    check_folder(folder)
    placement = placement or choose_placement("cpu", "auto", cuda_gpus=0, bf16_supported=False)
    model = load_model(Path(folder), placement)
    return model, load_sentencepiece(folder, model)


def _labels(config: EvaluateConfig) -> list[str]:
    if not config.models:
        raise EvaluateInputError("--models names no model folder.")
    if config.labels and len(config.labels) != len(config.models):
        raise EvaluateInputError(
            f"--labels gives {len(config.labels)} names for {len(config.models)} --models; give one each."
        )
    labels = list(config.labels) or [Path(m).name for m in config.models]
    if len(set(labels)) != len(labels):
        raise EvaluateInputError(f"model labels {labels} repeat; pass distinct --labels.")
    return labels


# --- report --------------------------------------------------------------------------------------------


def _task_cell(result: dict[str, Any] | None) -> str:
    if not result or result.get("value") is None:
        return "n/a"
    stderr = f" ± {result['stderr']:.3f}" if result.get("stderr") else ""
    return f"{result['value']:.3f}{stderr}"


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table: bits and tokens per byte per held-out set, then each lm-eval task."""
    tasks = list(rows[0].get("lm_eval") or {}) if rows else []
    metrics = {task: rows[0]["lm_eval"][task]["metric"] for task in tasks}
    lines = [
        "| model | domain bits/byte | general bits/byte | domain tokens/byte | general tokens/byte |"
        + "".join(f" {task} ({metrics[task]}) |" for task in tasks),
        "|---|---:|---:|---:|---:|" + "---:|" * len(tasks),
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['domain']['bits_per_byte']:.3f} "
            f"| {row['general']['bits_per_byte']:.3f} | {row['domain']['tokens_per_byte']:.3f} "
            f"| {row['general']['tokens_per_byte']:.3f} |"
            + "".join(f" {_task_cell(row['lm_eval'].get(task))} |" for task in tasks)
        )
    return "\n".join(lines) + "\n"


def plot_bits_per_byte(rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: bits per byte per model (domain, general) and, beside it, each lm-eval task's score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(rows[0].get("lm_eval") or {}) if rows else []
    panels = 2 if tasks else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(6, 1.6 * len(rows) + 2) * panels, 4), squeeze=False)
    ax = axes[0][0]
    width = 0.38
    for offset, dataset in ((-width / 2, "domain"), (width / 2, "general")):
        values = [row[dataset]["bits_per_byte"] for row in rows]
        bars = ax.bar([i + offset for i in range(len(rows))], values, width, label=f"{dataset} held-out")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(rows)), [row["label"] for row in rows], rotation=15)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("Held-out bits per byte")
    ax.legend()
    if tasks:
        ax = axes[0][1]
        width = 0.8 / len(tasks)
        for k, task in enumerate(tasks):
            values = [row["lm_eval"][task]["value"] or 0.0 for row in rows]
            errors = [row["lm_eval"][task]["stderr"] or 0.0 for row in rows]
            positions = [i - 0.4 + width * (k + 0.5) for i in range(len(rows))]
            bars = ax.bar(positions, values, width, yerr=errors, capsize=2,
                          label=f"{task} ({rows[0]['lm_eval'][task]['metric']})")
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        if any(task.startswith("dapt_nextline") for task in tasks):
            ax.axhline(0.25, color="grey", linestyle=":", linewidth=1, label="chance (4 choices)")
        ax.set_xticks(range(len(rows)), [row["label"] for row in rows], rotation=15)
        ax.set_ylabel("accuracy (higher is better)")
        ax.set_ylim(0, 1)
        ax.set_title("General capability (lm-evaluation-harness)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the stage -----------------------------------------------------------------------------------------


def _release_memory() -> None:
    """Give back the memory of a model no longer referenced (before the next one loads)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _batch_limits(config: EvaluateConfig, placement: Placement) -> tuple[int | None, int | None]:
    """(windows, padded tokens) per forward pass: the user's, else 8 windows on CPU, 16,384 tokens on CUDA."""
    if placement.device == "cpu":
        return (CPU_BATCH_WINDOWS if config.batch_size is None else config.batch_size), config.batch_tokens
    return config.batch_size, (CUDA_BATCH_TOKENS if config.batch_tokens is None else config.batch_tokens)


def _model_row(label: str, folder: Path, config: EvaluateConfig, texts: dict[str, list[str]],
               lm_eval_setup: tuple[list[str], Any] | None) -> tuple[dict[str, Any], Placement]:
    """Load one model, score both held-out sets and run the lm-eval tasks on it."""
    vocab = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("vocab_size", 32000)
    batch_tokens = config.batch_tokens if config.batch_tokens is not None else CUDA_BATCH_TOKENS
    placement = select_placement(config.device, config.dtype, Path(folder), batch_tokens, int(vocab))
    model = load_model(Path(folder), placement)
    sp = load_sentencepiece(folder, model)
    max_rows, max_tokens = _batch_limits(config, placement)
    row: dict[str, Any] = {"label": label, "path": str(folder), "tokenizer_sha256": file_sha256(
        Path(folder) / "tokenizer.model"), "tokenizer_pieces": sp.get_piece_size()}
    for name in DATASETS:
        score = score_texts(model, sp, texts[name], config.max_length, max_rows, progress=f"{label} / {name}",
                            batch_tokens=max_tokens)
        row[name] = {**asdict(score), "bits_per_byte": score.bits_per_byte,
                     "tokens_per_byte": score.tokens_per_byte, "tokens_per_second": score.tokens_per_second}
    row["lm_eval"] = {}
    if lm_eval_setup is not None:
        from transformers import AutoTokenizer

        from dapt.general_eval import run_tasks

        tasks, manager = lm_eval_setup
        row["lm_eval"] = run_tasks(model, AutoTokenizer.from_pretrained(str(folder)), tasks, manager,
                                   limit=config.lm_eval_limit, num_fewshot=config.lm_eval_fewshot,
                                   batch_size=config.lm_eval_batch_size, max_length=config.max_length)
    del model, sp
    _release_memory()
    return row, placement


def _summary_line(row: dict[str, Any], placement: Placement) -> str:
    speed = sum(row[n]["num_tokens"] for n in DATASETS) / max(1e-9, sum(row[n]["seconds"] for n in DATASETS))
    tasks = "".join(f", {task} {result['metric']} {_task_cell(result)}" for task, result in row["lm_eval"].items())
    return (f"{row['label']}: domain {row['domain']['bits_per_byte']:.3f} bits/byte, "
            f"general {row['general']['bits_per_byte']:.3f} bits/byte{tasks} "
            f"({speed:,.0f} tokens/s, {placement.device} {placement.dtype})")


def evaluate(config: EvaluateConfig) -> Path:
    """Score every model on both held-out sets and the lm-eval tasks; write results.json, results.md and
    bits_per_byte.png (the table is not printed: one line per model is)."""
    import tempfile

    import torch

    from dapt.general_eval import LM_EVAL_VERSION, LOCAL_TASKS, requested_tasks, task_manager, write_local_tasks

    validate_config(config)
    labels = _labels(config)
    tasks = requested_tasks(config.lm_eval_tasks)
    for folder in config.models:
        if not Path(folder).is_dir():
            raise EvaluateInputError(f"model folder {folder} does not exist; train or build it first.")
    folders = dict(zip(labels, (Path(m) for m in config.models), strict=True))
    tokenizers = {label: check_folder(folder) for label, folder in folders.items()}
    check_not_stale(folders, tokenizers)
    corpora = {
        "domain": load_corpus(config.domain_heldout, "domain held-out", config.text_keys),
        "general": load_corpus(config.general_heldout, "general held-out", config.text_keys),
    }
    texts = {name: [d.text for d in corpus.documents[:config.max_documents]]
             for name, corpus in corpora.items()}
    if config.threads is not None:
        torch.set_num_threads(config.threads)

    rows, placements = [], []
    inputs = {"heldout": {name: corpus.summary() for name, corpus in corpora.items()}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="dapt-lm-eval-") as task_dir:
        lm_eval_setup = None
        if tasks:
            include = [Path(task_dir)] + ([Path(config.lm_eval_include)] if config.lm_eval_include else [])
            if any(task in LOCAL_TASKS for task in tasks):
                write_local_tasks(Path(task_dir), texts, config.lm_eval_items)
            lm_eval_setup = (tasks, task_manager(include, tasks))
        for label, folder in folders.items():
            row, placement = _model_row(label, folder, config, texts, lm_eval_setup)
            rows.append(row)
            placements.append(placement)
            inputs["models"][label] = {"path": str(folder), "tokenizer_sha256": tokenizers[label],
                                       "stage": (read_manifest(folder) or {}).get("stage")}
            print(_summary_line(row, placement))
        table = results_markdown(rows)
        with stage_output(config.output, "evaluate", config, inputs) as tmp:
            write_json(tmp / "results.json", {
                "definition": __doc__.split("\n\n")[2].replace("\n", " "),
                "placement": [asdict(p) for p in placements],
                "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                "lm_eval": {"version": LM_EVAL_VERSION if tasks else None, "tasks": tasks,
                            "limit": config.lm_eval_limit, "fewshot": config.lm_eval_fewshot,
                            "local_tasks": {t: f"lm_eval_tasks/{t}.jsonl" for t in tasks if t in LOCAL_TASKS}},
                "results": rows})
            (tmp / "results.md").write_text(table, encoding="utf-8")
            plot_bits_per_byte(rows, tmp / "bits_per_byte.png")
            local = [t for t in tasks if t in LOCAL_TASKS]
            if local:
                (tmp / "lm_eval_tasks").mkdir()
                for task in local:  # the questions asked, for the record
                    shutil.copyfile(Path(task_dir) / f"{task}.jsonl", tmp / "lm_eval_tasks" / f"{task}.jsonl")
    print(f"results: {Path(config.output) / 'results.md'} (table), results.json, bits_per_byte.png")
    return Path(config.output)
