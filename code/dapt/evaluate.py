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
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dapt.artifacts import file_sha256, read_manifest, stage_output, write_json
from dapt.config import DEFAULT_OUTPUTS, param
from dapt.corpus import DEFAULT_HELDOUT, load_corpus
from dapt.errors import UserInputError

DATASETS = ("domain", "general")


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
    labels: tuple[str, ...] = param((), "one display name per model; empty: the folder names")
    domain_heldout: Path = param(DEFAULT_HELDOUT / "domain", "held-out domain JSONL file or folder")
    general_heldout: Path = param(DEFAULT_HELDOUT / "general", "held-out general JSONL file or folder")
    output: Path = param(DEFAULT_OUTPUTS / "tiny" / "evaluation", "output folder (table, JSON, plot)")
    text_keys: tuple[str, ...] = param(("text",), "JSON keys that may hold a record's text")
    max_documents: int | None = param(None, "score only the first N documents of each held-out set")
    max_length: int | None = param(None, "window length; None: the model's max_position_embeddings")
    batch_size: int = param(8, "windows per forward pass")
    threads: int | None = param(None, "torch CPU threads; None: torch's choice")


@dataclass(frozen=True)
class Score:
    """Totals of one model on one set of documents."""

    nll_bits: float
    num_bytes: int
    num_tokens: int
    num_documents: int

    @property
    def bits_per_byte(self) -> float:
        return self.nll_bits / self.num_bytes

    @property
    def tokens_per_byte(self) -> float:
        return self.num_tokens / self.num_bytes


def _windows(ids: list[int], max_length: int) -> list[list[int]]:
    """Windows of at most ``max_length`` tokens, each starting at the previous one's last token.

    Every token but the first (BOS) is a prediction target in exactly one window.
    """
    if max_length < 2:
        raise EvaluateInputError(f"--max-length must be at least 2 (got {max_length}).")
    return [ids[start:start + max_length] for start in range(0, len(ids) - 1, max_length - 1)]


def score_texts(model: Any, sp: Any, texts: Iterable[str], max_length: int | None = None,
                batch_size: int = 8, progress: str | None = None) -> Score:
    """Total NLL (bits), UTF-8 bytes and tokens of ``texts`` under ``model`` with tokenizer ``sp``.

    ``sp`` is a ``sentencepiece.SentencePieceProcessor``; windows of equal-ish length
    are batched (right padding is harmless under causal attention and is not scored).
    """
    import torch

    max_length = max_length or int(model.config.max_position_embeddings)
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
    windows.sort(key=len, reverse=True)
    total_nats = 0.0
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(windows), batch_size), desc=progress, unit=" batches",
                          disable=progress is None, leave=False):
            batch = windows[start:start + batch_size]
            width = len(batch[0])
            tokens = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width - 1), dtype=torch.bool)
            for row, window in enumerate(batch):
                tokens[row, :len(window)] = torch.tensor(window)
                scored[row, :len(window) - 1] = True
            logits = model(input_ids=tokens).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
            ).reshape(scored.shape)
            total_nats += float(nll[scored].double().sum())
    return Score(nll_bits=total_nats / math.log(2), num_bytes=num_bytes, num_tokens=num_tokens,
                 num_documents=num_docs)


def bits_per_byte(model: Any, sp: Any, texts: Sequence[str], max_length: int | None = None) -> float:
    """Bits per UTF-8 byte of ``texts`` under an HF causal LM and its SentencePiece processor ``sp``."""
    return score_texts(model, sp, texts, max_length=max_length).bits_per_byte


def load_model_and_tokenizer(folder: Path) -> tuple[Any, Any]:
    """An HF causal LM (fp32, SDPA attention) and the SentencePiece processor of its folder."""
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise EvaluateInputError(f"model folder {folder} has no config.json; pass an HF checkpoint folder.")
    if not (folder / "tokenizer.model").is_file():
        raise EvaluateInputError(
            f"model folder {folder} has no tokenizer.model; each model is scored with its own tokenizer."
        )
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa").to(torch.float32)
    rows = model.get_input_embeddings().num_embeddings
    if sp.get_piece_size() > rows:
        raise EvaluateInputError(
            f"{folder}/tokenizer.model has {sp.get_piece_size()} pieces but the model only {rows} embedding "
            "rows; the tokenizer belongs to another model (extend it with `python -m dapt embeddings`)."
        )
    return model, sp


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


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table (bits per byte and tokens per byte, per held-out set)."""
    lines = [
        "| model | domain bits/byte | general bits/byte | domain tokens/byte | general tokens/byte |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['domain']['bits_per_byte']:.3f} "
            f"| {row['general']['bits_per_byte']:.3f} | {row['domain']['tokens_per_byte']:.3f} "
            f"| {row['general']['tokens_per_byte']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_bits_per_byte(rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bar chart: bits per byte per model, domain and general side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4))
    width = 0.38
    for offset, dataset in ((-width / 2, "domain"), (width / 2, "general")):
        values = [row[dataset]["bits_per_byte"] for row in rows]
        bars = ax.bar([i + offset for i in range(len(rows))], values, width, label=f"{dataset} held-out")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(rows)), [row["label"] for row in rows], rotation=15)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("Held-out bits per byte")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(config: EvaluateConfig) -> Path:
    """Score every model on both held-out sets; write results.json, results.md and bits_per_byte.png."""
    import torch

    labels = _labels(config)
    for folder in config.models:
        if not Path(folder).is_dir():
            raise EvaluateInputError(f"model folder {folder} does not exist; train or build it first.")
    corpora = {
        "domain": load_corpus(config.domain_heldout, "domain held-out", config.text_keys),
        "general": load_corpus(config.general_heldout, "general held-out", config.text_keys),
    }
    texts = {name: [d.text for d in corpus.documents[:config.max_documents]]
             for name, corpus in corpora.items()}
    if config.threads:
        torch.set_num_threads(config.threads)

    rows, inputs = [], {"heldout": {name: corpus.summary() for name, corpus in corpora.items()}, "models": {}}
    for label, folder in zip(labels, config.models, strict=True):
        model, sp = load_model_and_tokenizer(Path(folder))
        row: dict[str, Any] = {"label": label, "path": str(folder)}
        for name in DATASETS:
            score = score_texts(model, sp, texts[name], config.max_length, config.batch_size,
                                progress=f"{label} / {name}")
            row[name] = {**asdict(score), "bits_per_byte": score.bits_per_byte,
                         "tokens_per_byte": score.tokens_per_byte}
        rows.append(row)
        inputs["models"][label] = {"path": str(folder),
                                   "tokenizer_sha256": file_sha256(Path(folder) / "tokenizer.model"),
                                   "stage": (read_manifest(folder) or {}).get("stage")}
        print(f"{label}: domain {row['domain']['bits_per_byte']:.3f} bits/byte, "
              f"general {row['general']['bits_per_byte']:.3f} bits/byte")

    table = results_markdown(rows)
    with stage_output(config.output, "evaluate", config, inputs) as tmp:
        write_json(tmp / "results.json", {"definition": __doc__.split("\n\n")[2].replace("\n", " "),
                                          "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                                          "results": rows})
        (tmp / "results.md").write_text(table, encoding="utf-8")
        plot_bits_per_byte(rows, tmp / "bits_per_byte.png")
    print(table, end="")
    return Path(config.output)
