"""The ``embeddings`` stage: check its inputs, rewrite the shards, write the folder and its report.

Order of work: every input is checked before anything is written (parameters, checkpoint headers, both
tokenizers, the token list, the held-out text of the sanity check); then the output folder is built through
``dapt.artifacts.stage_output``: rewritten and linked shards, ``config.json`` and the shard index, the
adapted tokenizer files, the row-norm plot, the sanity check and ``report.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dapt.artifacts import file_sha256, jsonable, require_stage, stage_output, write_json
from dapt.config import CODE_DIR, DEFAULT_OUTPUTS, PROFILES, param
from dapt.embeddings.checkpoint import (
    EMBED,
    INDEX,
    LM_HEAD,
    Checkpoint,
    EmbeddingsError,
    open_checkpoint,
    read_json_file,
)
from dapt.embeddings.init_rules import InitPlan, extended_matrix, init_plans, subtoken_encoder, subtoken_ids
from dapt.embeddings.norms import plot_row_norms, row_norms, summary
from dapt.embeddings.safetensors_io import NewTensor, element_size, read_tensor, rewrite_safetensors
from dapt.embeddings.sanity import heldout_texts, sanity_check
from dapt.embeddings.vocabulary import (
    NewToken,
    TokenizerFiles,
    check_compatibility,
    load_sentencepiece_proto,
)

STAGE = "embeddings"
DOMAIN_TOKENS_FILES = ("domain_tokens.json", "added_tokens.json")  # the tokenizer stage's list of new tokens
ADAPTED_TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    *DOMAIN_TOKENS_FILES,
)
COPIED_EXTRA_FILES = ("generation_config.json",)
COPIED_LICENCE_PREFIXES = ("LICENSE", "LICENCE", "USE_POLICY", "NOTICE")
CHOICES = {
    "input_init": ("mean", "random"),
    "output_init": ("zero", "mean"),
    "reserved_init": ("mean", "zero"),
}
MAX_SEED = 2**63 - 1


@dataclass
class EmbeddingsConfig:
    """Parameters of the ``embeddings`` stage."""

    base_model: Path = param(DEFAULT_OUTPUTS / "tiny" / "base_model", "base HF Llama checkpoint folder")
    tokenizer: Path = param(
        DEFAULT_OUTPUTS / "tiny" / "tokenizer", "adapted tokenizer folder (tokenizer stage)"
    )
    output: Path = param(DEFAULT_OUTPUTS / "tiny" / "extended_model", "output HF checkpoint folder")
    base_tokenizer: Path | None = param(
        None, "base SentencePiece model; None: BASE_MODEL/tokenizer.model"
    )
    input_init: Literal["mean", "random"] = param("mean", "new input rows: mean of sub-token rows, or random")
    output_init: Literal["zero", "mean"] = param("zero", "new output rows: zero (ChipNeMo paper) or mean")
    reserved_init: Literal["mean", "zero"] = param(
        "mean", "reserved padding rows: mean of all base rows, or zero"
    )
    untie_embeddings: bool = param(False, "write a separate lm_head.weight for a model with tied embeddings")
    vocab_multiple: int = param(
        128 * PROFILES["tiny"].max_tensor_parallel,
        "require the new vocabulary to be a multiple of this: 128 x the largest tensor-parallel size, as the "
        "tokenizer stage pads it (--max-tensor-parallel); 1 accepts any size",
    )
    seed: int = param(0, "seed for --input-init random")
    link_shards: bool = param(True, "hard-link unchanged shards instead of copying them")
    heldout: Path = param(CODE_DIR / "heldout" / "domain", "held-out JSONL scored by the sanity check")
    sanity_check: bool = param(True, "load the extended model and score held-out text (small models only)")
    sanity_max_bytes: int = param(1 << 30, "skip the sanity check for checkpoints larger than this")
    sanity_documents: int = param(8, "held-out documents scored by the sanity check")


def validate(config: EmbeddingsConfig) -> None:
    """Refuse parameters that cannot work, naming the user's value."""
    for name, allowed in CHOICES.items():
        value = getattr(config, name)
        if value not in allowed:
            flag = "--" + name.replace("_", "-")
            raise EmbeddingsError(f"{flag} {value!r} is not one of {', '.join(allowed)}.")
    numbers = (
        (config.vocab_multiple >= 1, f"--vocab-multiple {config.vocab_multiple} must be at least 1 "
         "(1 accepts any vocabulary size; NeMo needs 128 x the tensor-parallel size)"),
        (0 <= config.seed <= MAX_SEED, f"--seed {config.seed} must be from 0 to {MAX_SEED}"),
        (config.sanity_max_bytes >= 0, f"--sanity-max-bytes {config.sanity_max_bytes} must be 0 or more "
         "(use --no-sanity-check to skip the check)"),
        (config.sanity_documents >= 1, f"--sanity-documents {config.sanity_documents} must be at least 1 "
         "(use --no-sanity-check to skip the check)"),
    )
    for ok, message in numbers:
        if not ok:
            raise EmbeddingsError(message + ".")
    out, base, tok = (Path(p).resolve() for p in (config.output, config.base_model, config.tokenizer))
    for other, what in ((base, "--base-model"), (tok, "--tokenizer")):
        if out == other or other in out.parents or out in other.parents:
            raise EmbeddingsError(
                f"--output {config.output} overlaps {what} {other}; choose a separate folder."
            )


def tokenizer_files(config: EmbeddingsConfig, checkpoint: Checkpoint) -> TokenizerFiles:
    """The tokenizer files the stage reads; each missing one is refused with the option that names it."""
    adapted_folder = Path(config.tokenizer)
    if not adapted_folder.is_dir():
        raise EmbeddingsError(
            f"--tokenizer {adapted_folder} is not a folder; pass the output folder of `python -m dapt tokenizer`"
            " (it holds tokenizer.model and domain_tokens.json)."
        )
    require_stage(adapted_folder, "tokenizer", "--tokenizer")
    files = TokenizerFiles(
        base=Path(config.base_tokenizer or checkpoint.folder / "tokenizer.model"),
        base_given=config.base_tokenizer is not None,
        adapted_folder=adapted_folder,
        adapted=adapted_folder / "tokenizer.model",
        added=next(
            (adapted_folder / n for n in DOMAIN_TOKENS_FILES if (adapted_folder / n).is_file()),
            adapted_folder / DOMAIN_TOKENS_FILES[0],
        ),
    )
    if not files.base.is_file():
        raise EmbeddingsError(
            f"--base-tokenizer {files.base} does not exist; pass the SentencePiece model the checkpoint was "
            "trained with."
            if files.base_given
            else f"--base-model {checkpoint.folder} has no tokenizer.model; pass --base-tokenizer (the "
            "SentencePiece model the checkpoint was trained with)."
        )
    if not files.added.is_file():
        raise EmbeddingsError(
            f"--tokenizer {adapted_folder} has no {DOMAIN_TOKENS_FILES[0]} (the tokenizer stage's list of new "
            "tokens); point --tokenizer to the output folder of `python -m dapt tokenizer`."
        )
    return files


def _fingerprints(checkpoint: Checkpoint, files: TokenizerFiles) -> dict:
    return {
        "base_model": {
            "path": str(checkpoint.folder),
            "config_sha256": file_sha256(checkpoint.folder / "config.json"),
            # shards: size and header hash (hashing 13+ GB of weights would dominate the run)
            "shards": {
                name: {"bytes": f.path.stat().st_size, "header_sha256": f.header_sha256}
                for name, f in checkpoint.files.items()
            },
        },
        "base_tokenizer": {"path": str(files.base), "sha256": file_sha256(files.base)},
        "tokenizer": {
            "path": str(files.adapted_folder),
            "sha256": file_sha256(files.adapted),
            "domain_tokens_sha256": file_sha256(files.added),
        },
    }


def _sanity_texts(config: EmbeddingsConfig) -> list[str]:
    """The held-out documents of the sanity check; a missing or empty source is refused up front."""
    source = Path(config.heldout)
    if not source.exists():
        raise EmbeddingsError(
            f"--heldout {source} does not exist; pass a held-out JSONL file or folder for the sanity check, "
            "or --no-sanity-check."
        )
    texts = heldout_texts(source, config.sanity_documents)
    if not any(texts):
        raise EmbeddingsError(
            f"--heldout {source} holds no non-empty document; pass held-out JSONL with a text field, "
            "or --no-sanity-check."
        )
    return texts


def _link_or_copy(source: Path, target: Path, link: bool) -> str:
    if link:
        try:
            os.link(source, target)
            return "linked"
        except OSError:
            pass
    shutil.copy2(source, target)
    return "copied"


@dataclass
class Surgery:
    """What is written where: the new tensors per shard, and the row norms gathered as they are made."""

    replacements: dict[str, dict[str, NewTensor]]
    norms: dict[str, dict[str, np.ndarray]]
    untied: bool  # a separate lm_head.weight is written for a tied base

    def data_bytes(self, checkpoint: Checkpoint) -> int:
        """Total tensor bytes of the extended checkpoint (the shard index's ``total_size``)."""
        total = 0
        for name, file in checkpoint.files.items():
            new = self.replacements.get(name, {})
            total += sum(t.end - t.begin for key, t in file.tensors.items() if key not in new)
            total += sum(int(np.prod(t.shape)) * element_size(t.dtype) for t in new.values())
        return total


def plan_surgery(
    config: EmbeddingsConfig,
    checkpoint: Checkpoint,
    tokens: list[NewToken],
    subtokens: dict[int, list[int]],
    new_vocab: int,
    plans: tuple[InitPlan, InitPlan | None],
) -> Surgery:
    """The new embedding (and output) tensors, made lazily when their shard is written."""
    input_plan, output_plan = plans
    norms: dict[str, dict[str, np.ndarray]] = {}

    def producer(source_tensor: str, plan: InitPlan, label: str) -> Callable[[], Any]:
        def make() -> Any:
            base = read_tensor(checkpoint.file_of(source_tensor), source_tensor)
            matrix = extended_matrix(base, tokens, subtokens, plan, config.seed + len(norms))
            norms[label] = row_norms(matrix, tokens)
            return matrix

        return make

    embed = checkpoint.entry(EMBED)
    shape = (new_vocab, embed.shape[1])
    replacements: dict[str, dict[str, NewTensor]] = {}
    replacements.setdefault(checkpoint.weight_map[EMBED], {})[EMBED] = NewTensor(
        embed.dtype,
        shape,
        producer(EMBED, input_plan, "input embeddings" if output_plan else "tied embeddings"),
    )
    if output_plan is not None:
        head_source = EMBED if checkpoint.tied else LM_HEAD
        head_file = checkpoint.weight_map[head_source]
        replacements.setdefault(head_file, {})[LM_HEAD] = NewTensor(
            checkpoint.entry(head_source).dtype, shape, producer(head_source, output_plan, "output layer")
        )
    return Surgery(replacements, norms, untied=output_plan is not None and checkpoint.tied)


def extend_embeddings(config: EmbeddingsConfig) -> Path:
    """Stage entry: the base checkpoint with embeddings resized and initialised for the adapted tokenizer."""
    import sentencepiece as spm

    start = time.perf_counter()
    validate(config)
    checkpoint = open_checkpoint(config.base_model)
    files = tokenizer_files(config, checkpoint)
    base_proto = load_sentencepiece_proto(files.base, files.base_label)
    adapted_proto = load_sentencepiece_proto(files.adapted, f"--tokenizer {files.adapted_folder}")
    added = read_json_file(files.added, "token list")
    tokens = check_compatibility(checkpoint, base_proto, adapted_proto, added, files, config.vocab_multiple)
    plans = init_plans(
        config.input_init,
        config.output_init,
        config.reserved_init,
        checkpoint.tied,
        config.untie_embeddings,
        checkpoint.folder,
    )
    encoder = subtoken_encoder(base_proto)
    subtokens = {t.id: subtoken_ids(encoder, t.token) for t in tokens if t.kind == "domain"}
    empty = [t.token for t in tokens if t.kind == "domain" and not subtokens[t.id]]
    if empty:
        raise EmbeddingsError(
            f"{files.added}: tokens with an empty surface text: {empty[:5]}; rerun the tokenizer stage."
        )
    new_vocab = len(adapted_proto.pieces)
    surgery = plan_surgery(config, checkpoint, tokens, subtokens, new_vocab, plans)
    total_size = surgery.data_bytes(checkpoint)
    run_sanity = config.sanity_check and total_size <= config.sanity_max_bytes
    texts = _sanity_texts(config) if run_sanity else []

    output_plan = plans[1]
    report: dict[str, Any] = {
        "base_vocab_size": len(base_proto.pieces),
        "vocab_size": new_vocab,
        "domain_tokens": sum(t.kind == "domain" for t in tokens),
        "reserved_tokens": sum(t.kind == "reserved" for t in tokens),
        "tied_embeddings_in_base": checkpoint.tied,
        "tied_embeddings_in_output": output_plan is None,
        "input_init": config.input_init,
        "output_init": config.output_init if output_plan else "tied",
        "reserved_init": config.reserved_init,
        "subtokens_per_domain_token": round(float(np.mean([len(v) for v in subtokens.values()] or [0])), 3),
        "shards": {},
    }
    with stage_output(config.output, STAGE, jsonable(config), _fingerprints(checkpoint, files)) as folder:
        written = _write_shards(checkpoint, surgery, folder, config.link_shards, report["shards"])
        if written != total_size:
            raise RuntimeError(f"wrote {written} tensor bytes, planned {total_size}")
        _write_config(checkpoint, folder, new_vocab, untied=surgery.untied)
        if checkpoint.index is not None:
            _write_index(checkpoint, folder, total_size, lm_head_added=output_plan is not None)
        _copy_side_files(checkpoint.folder, files.adapted_folder, folder)
        plot_row_norms(surgery.norms, folder / "embedding_norms.png")
        report["row_norms"] = {
            matrix: {group: summary(values) for group, values in groups.items()}
            for matrix, groups in surgery.norms.items()
        }
        report["surgery_seconds"] = round(time.perf_counter() - start, 2)
        if run_sanity:
            report["sanity_check"] = sanity_check(
                checkpoint.folder,
                folder,
                spm.SentencePieceProcessor(model_file=str(files.base)),
                spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")),
                texts,
            )
        else:
            report["sanity_check"] = {"skipped": _skip_reason(config, total_size)}
        write_json(folder / "report.json", report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("row_norms",)}, indent=1))
    return Path(config.output)


def _skip_reason(config: EmbeddingsConfig, total_size: int) -> str:
    if not config.sanity_check:
        return "--no-sanity-check"
    return f"the extended weights ({total_size} bytes) exceed --sanity-max-bytes {config.sanity_max_bytes}"


def _write_shards(
    checkpoint: Checkpoint, surgery: Surgery, folder: Path, link: bool, shards: dict[str, str]
) -> int:
    """Rewrite the shards holding a new tensor, link or copy the others; returns the tensor bytes."""
    total = 0
    for name, file in checkpoint.files.items():
        if name in surgery.replacements:
            total += rewrite_safetensors(file, folder / name, surgery.replacements[name])
            shards[name] = "rewritten"
        else:
            total += sum(t.end - t.begin for t in file.tensors.values())
            shards[name] = _link_or_copy(file.path, folder / name, link)
    return total


def _write_config(checkpoint: Checkpoint, folder: Path, vocab_size: int, untied: bool) -> None:
    config = dict(checkpoint.config)
    config["vocab_size"] = vocab_size
    if untied:
        config["tie_word_embeddings"] = False
    write_json(folder / "config.json", config)


def _write_index(checkpoint: Checkpoint, folder: Path, total_size: int, lm_head_added: bool) -> None:
    index = json.loads(json.dumps(checkpoint.index))
    index.setdefault("metadata", {})["total_size"] = total_size
    if lm_head_added:
        index["weight_map"][LM_HEAD] = checkpoint.weight_map[EMBED if checkpoint.tied else LM_HEAD]
    write_json(folder / INDEX, index)


def _copy_side_files(base_folder: Path, adapted_folder: Path, folder: Path) -> None:
    """Generation config and licence files from the base; tokenizer files from the ADAPTED folder only."""
    for path in sorted(base_folder.iterdir()):
        if path.is_file() and (
            path.name in COPIED_EXTRA_FILES or path.name.upper().startswith(COPIED_LICENCE_PREFIXES)
        ):
            shutil.copy2(path, folder / path.name)
    for name in ADAPTED_TOKENIZER_FILES:
        if (adapted_folder / name).is_file():
            shutil.copy2(adapted_folder / name, folder / name)
