"""Stage ``data``: JSONL corpora -> Megatron indexed datasets (``.bin``/``.idx``) with the adapted tokenizer.

The files are written by megatron-core's own ``IndexedDatasetBuilder``, so they are
exactly what NeMo's ``preprocess_data_for_megatron.py`` writes and what NeMo and
Megatron read: one document per JSONL record, its SentencePiece ids followed by the
tokenizer's end-of-document id, token dtype chosen by megatron for the vocabulary size.

Outputs for ``--output-prefix PREFIX`` (the contract with ``train`` and ``launch``)::

    PREFIX_train_text_document.bin/.idx
    PREFIX_validation_text_document.bin/.idx
    PREFIX_test_text_document.bin/.idx
    PREFIX.dapt.json    tokenizer hash, vocab size, EOD id, dtype, per-split counts, parameters

Documents are split train/validation/test by a seeded permutation (document level,
deterministic). Encoding runs in worker processes, results come back in order. A long
document is encoded in pieces of about 16 Ki characters cut where the ids stay exactly those of the
whole document (:mod:`dapt.piecewise`) and written piece by piece, so memory stays bounded
(SentencePiece needs about 110 bytes per byte of one text it encodes). While the stage runs
it holds a lock on the prefix (a second ``data`` into the same prefix is refused), removes a
killed run's temporary files, writes everything under temporary names and renames it into
place at the end; finished files follow the umask.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dapt import piecewise
from dapt.artifacts import file_sha256, make_readable, output_lock, storage_errors_reported, write_json
from dapt.config import DEFAULT_DOMAIN_DATA, DEFAULT_OUTPUTS, param
from dapt.corpus import Document, iter_documents
from dapt.errors import UserInputError

SPLITS = ("train", "validation", "test")
SIDECAR_SUFFIX = ".dapt.json"
# ChipNeMo mixed about 9% public data into DAPT (Liu et al. 2023, "ChipNeMo", section 2).
CHIPNEMO_GENERAL_SHARE = 0.09
_BATCH_BYTES = 256 * 1024  # texts per worker task: large enough to amortise IPC, small enough to balance


class DataMismatchError(UserInputError):
    """A dataset was built with another tokenizer, or its files do not match its record."""


@dataclass
class DataConfig:
    """Tokenize a folder of JSONL files into Megatron train/validation/test indexed datasets."""

    tokenizer: Path = param(DEFAULT_OUTPUTS / "tiny" / "tokenizer",
                            "adapted tokenizer folder holding tokenizer.model (or the .model file itself)")
    input: Path = param(DEFAULT_DOMAIN_DATA, "JSONL file or folder of *.jsonl files (searched recursively)")
    output_prefix: Path = param(DEFAULT_OUTPUTS / "tiny" / "megatron_data" / "domain",
                                "output prefix: PREFIX_<split>_text_document.bin/.idx and PREFIX.dapt.json")
    text_keys: tuple[str, ...] = param(("text",), "JSON keys holding the text; the first present one is used")
    split_percent: tuple[float, ...] = param((98.0, 1.0, 1.0),
                                             "train, validation, test shares of documents, summing to 100")
    seed: int = param(1234, "seed of the document-level split (an integer >= 0)")
    workers: int = param(0, "encoding processes: 0 (the default) = one per CPU this process may use, "
                            "1 = encode in this process, N > 1 = N worker processes; negative is refused")


# --- tokenizer ---------------------------------------------------------------------------------------------


def tokenizer_model_path(tokenizer: str | os.PathLike) -> Path:
    """The ``tokenizer.model`` of a tokenizer folder (or the given ``.model`` file)."""
    path = Path(tokenizer)
    model = path / "tokenizer.model" if path.is_dir() else path
    if not model.is_file():
        raise UserInputError(
            f"tokenizer: {model} does not exist; pass the adapted tokenizer folder written by "
            "`python -m dapt tokenizer` (it holds tokenizer.model)."
        )
    return model


def load_sentencepiece(model_path: str | os.PathLike):
    """Load a SentencePiece model with a clear error for files that are not one."""
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError) as error:
        raise UserInputError(f"tokenizer: {model_path} is not a SentencePiece model ({error}).") from None


def _indexed_dataset_module():
    """megatron-core's indexed_dataset, imported without its notes about the absent GPU-only extras."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> type:
    """The token dtype megatron-core picks for a vocabulary of this size (uint16 below 65500, else int32)."""
    return _indexed_dataset_module().DType.optimal_dtype(vocab_size)


# --- split ------------------------------------------------------------------------------------------------


def _check_split_percent(split_percent: tuple[float, ...]) -> tuple[float, float, float]:
    if len(split_percent) != 3:
        raise UserInputError(
            f"--split-percent takes three numbers (train validation test), got {list(split_percent)}."
        )
    if any(p < 0 for p in split_percent) or not math.isclose(sum(split_percent), 100.0, abs_tol=1e-6):
        raise UserInputError(
            f"--split-percent {list(split_percent)}: each share must be >= 0 and the sum must be 100."
        )
    if split_percent[0] <= 0:
        raise UserInputError(f"--split-percent {list(split_percent)}: the train share must be above 0.")
    return float(split_percent[0]), float(split_percent[1]), float(split_percent[2])


def split_counts(num_documents: int, split_percent: tuple[float, ...]) -> dict[str, int]:
    """Documents per split: each share with a positive percent gets at least one document.

    Raises :class:`UserInputError` when the corpus is too small to give every split
    with a positive percent a document and still keep at least one for training.
    """
    train_pct, val_pct, test_pct = _check_split_percent(split_percent)
    counts = {}
    for name, pct in (("validation", val_pct), ("test", test_pct)):
        counts[name] = max(1, round(num_documents * pct / 100)) if pct > 0 else 0
    counts["train"] = num_documents - counts["validation"] - counts["test"]
    if counts["train"] < 1:
        raise UserInputError(
            f"only {num_documents} documents: too few to give train, validation ({val_pct}%) and test "
            f"({test_pct}%) at least one document each. Add documents, or set a share to 0 with "
            "--split-percent (a split with 0% is written empty)."
        )
    return {name: counts[name] for name in SPLITS}


def assign_splits(num_documents: int, split_percent: tuple[float, ...], seed: int) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) of every document, from a seeded permutation."""
    counts = split_counts(num_documents, split_percent)
    order = np.random.default_rng(seed).permutation(num_documents)
    assignment = np.zeros(num_documents, dtype=np.int8)
    val_end = counts["validation"]
    assignment[order[:val_end]] = 1
    assignment[order[val_end:val_end + counts["test"]]] = 2
    return assignment


# --- parallel encoding ------------------------------------------------------------------------------------

# A unit of work is one piece of a document: (text, is_first, is_last); a short document is one piece.
Piece = tuple[str, bool, bool]
_PIECE_CHARS = piecewise.PIECE_CHARS
_MAX_PIECE_CHARS = piecewise.MAX_PIECE_CHARS
_worker_encoder: piecewise.PieceEncoder | None = None
_worker_dtype: Any = None


def _init_worker(model_path: str, dtype_name: str) -> None:
    global _worker_encoder, _worker_dtype
    _worker_encoder = piecewise.PieceEncoder(model_path)
    _worker_dtype = np.dtype(dtype_name)


def _encode_batch(pieces: list[Piece]) -> list[tuple[np.ndarray, bool]]:
    """Encode a batch of pieces in a worker (one thread each): ``(ids, is_last)``, EOD after a document's end.

    Whole documents are encoded in one call; other pieces each with the processor their place needs.
    """
    encoder = _worker_encoder
    eod = encoder.whole.eos_id()
    whole = [index for index, (_, first, last) in enumerate(pieces) if first and last]
    ids: list[list[int] | None] = [None] * len(pieces)
    for index, encoded in zip(whole, encoder.whole.encode([pieces[i][0] for i in whole], num_threads=1),
                              strict=True):
        ids[index] = encoded
    for index, (text, first, last) in enumerate(pieces):
        if ids[index] is None:
            ids[index] = encoder.processor_for(first, last).encode(text)
    return [(np.array([*doc, eod] if last else doc, dtype=_worker_dtype), last)
            for doc, (_, _, last) in zip(ids, pieces, strict=True)]


def document_pieces(docs: Iterable[Document], encoder: piecewise.PieceEncoder) -> Iterator[Piece]:
    """Every document as its pieces (long ones cut at safe places), in order; uncuttable ones name file:line."""
    for doc in docs:
        try:
            yield from encoder.pieces(doc.text)
        except piecewise.UncuttableTextError as error:
            raise piecewise.UncuttableTextError(f"{doc.path}:{doc.line}: {error}") from None


def _batches(pieces: Iterable[Piece], max_chars: int = _BATCH_BYTES) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_pieces(docs: Iterable[Document], model_path: str | os.PathLike, dtype: type,
                  workers: int) -> Iterator[tuple[np.ndarray, bool]]:
    """``(ids, is_last)`` of every piece of every document, in input order (EOD ends each document).

    ``workers`` > 1 encodes in a process pool; documents are cut into pieces here, in this process.
    """
    encoder = piecewise.PieceEncoder(model_path, piece_chars=_PIECE_CHARS, max_piece_chars=_MAX_PIECE_CHARS)
    batches = _batches(document_pieces(docs, encoder))
    init_args = (str(model_path), np.dtype(dtype).name)
    if workers <= 1:
        _init_worker(*init_args)
        for batch in batches:
            yield from _encode_batch(batch)
        return
    # fork where available: the workers start at once and share the already imported modules
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    pool_context = multiprocessing.get_context(method)
    with pool_context.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        for encoded in pool.imap(_encode_batch, batches, chunksize=1):
            yield from encoded


def resolve_workers(workers: int) -> int:
    """Worker processes for ``--workers``: 0 means one per CPU this process may run on; negative is refused."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserInputError(
            f"--workers {workers!r}: give 0 (one process per available CPU), 1 (encode in this process) "
            "or a number of worker processes."
        )
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- output files -----------------------------------------------------------------------------------------


def split_prefix(prefix: str | os.PathLike, split: str) -> str:
    """Path prefix of one split's indexed dataset: ``PREFIX_<split>_text_document``."""
    return f"{os.fspath(prefix)}_{split}_text_document"


def sidecar_path(prefix: str | os.PathLike) -> Path:
    """The ``PREFIX.dapt.json`` record of a dataset."""
    return Path(f"{os.fspath(prefix)}{SIDECAR_SUFFIX}")


def _temp_name(path: str, token: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{token}.partial")


class _DocumentWriter:
    """Feeds pieces to megatron's builders: a document of one piece through ``add_document``; a longer one
    piece by piece, then recorded as one sequence, as ``add_document`` would (same bytes, bounded memory)."""

    def __init__(self, builders: list, assignment: np.ndarray):
        self.builders, self.assignment = builders, assignment
        self.documents = 0
        self.pending = 0  # tokens already written of the current document
        self.counts = {split: {"documents": 0, "tokens": 0} for split in SPLITS}

    def add(self, ids: np.ndarray, last: bool) -> None:
        if self.documents >= len(self.assignment):
            raise UserInputError("input changed while being read (more documents than counted); run the stage "
                                 "again.")
        split_index = int(self.assignment[self.documents])
        builder = self.builders[split_index]
        if last and not self.pending:
            builder.add_document(ids, [ids.size])  # one sequence per document, as NeMo's preprocessing writes
        else:
            # megatron-core 0.8 and 0.16 alike: add_document writes the array to data_file, then
            # extends sequence_lengths and appends to document_indices; the same, in parts
            builder.data_file.write(np.asarray(ids, dtype=builder.dtype).tobytes(order="C"))
            if last:
                builder.sequence_lengths.append(self.pending + ids.size)
                builder.document_indices.append(len(builder.sequence_lengths))
        self.pending = 0 if last else self.pending + ids.size
        if last:
            total = self.counts[SPLITS[split_index]]
            total["documents"] += 1
            total["tokens"] += int(builder.sequence_lengths[-1])
            self.documents += 1


def _write_splits(prefix: str, pieces: Iterator[tuple[np.ndarray, bool]], assignment: np.ndarray,
                  dtype: type, token: str, temps: dict[str, str]) -> dict[str, dict[str, int]]:
    """Write every split with megatron's builder under temporary names (recorded in ``temps``)."""
    IndexedDatasetBuilder = _indexed_dataset_module().IndexedDatasetBuilder  # noqa: N806

    builders = []
    for split in SPLITS:
        final = split_prefix(prefix, split)
        temps[final + ".bin"] = _temp_name(final + ".bin", token)
        temps[final + ".idx"] = _temp_name(final + ".idx", token)
        builders.append(IndexedDatasetBuilder(temps[final + ".bin"], dtype=dtype))
    writer = _DocumentWriter(builders, assignment)
    for ids, last in pieces:
        writer.add(ids, last)
    for split, builder in zip(SPLITS, builders, strict=True):
        builder.finalize(temps[split_prefix(prefix, split) + ".idx"])
    return writer.counts


def _counted(pieces: Iterator[tuple[np.ndarray, bool]], progress: tqdm) -> Iterator[tuple[np.ndarray, bool]]:
    for ids, last in pieces:
        if last:
            progress.update(1)
        yield ids, last


def leftover_patterns(prefix: str | os.PathLike) -> list[str]:
    """Glob patterns (beside the prefix) of the temporary files a killed run of this prefix leaves."""
    name = Path(prefix).name
    token = "[0-9]*-" + "?" * 8
    finals = [f"{name}_{split}_text_document{ext}" for split in SPLITS for ext in (".bin", ".idx")]
    return [f".{final}.{token}.partial" for final in [*finals, name + SIDECAR_SUFFIX]]


def _file_record(prefix: str) -> dict[str, dict[str, Any]]:
    record = {}
    for split in SPLITS:
        base = split_prefix(prefix, split)
        record[split] = {
            "bin_bytes": os.path.getsize(base + ".bin"),
            "idx_sha256": file_sha256(base + ".idx"),
        }
    return record


def _cleanup(paths: Iterable[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# --- the stage --------------------------------------------------------------------------------------------


def _check_config(config: DataConfig) -> int:
    """Refuse parameters that cannot work (naming the user's value); return the number of workers."""
    _check_split_percent(config.split_percent)
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise UserInputError(f"--seed {config.seed!r}: the split's seed must be an integer >= 0.")
    if not config.text_keys:
        raise UserInputError("--text-keys: give at least one JSON key holding the text (e.g. text).")
    return resolve_workers(config.workers)


def build_megatron_data(config: DataConfig) -> dict[str, Any]:
    """Tokenize ``config.input`` into ``PREFIX_<split>_text_document.bin/.idx`` and ``PREFIX.dapt.json``.

    Returns the sidecar record. Rerunning replaces the files of the same prefix; a second run into
    the same prefix at the same time is refused (:func:`dapt.artifacts.output_lock`).
    """
    workers = _check_config(config)
    model_path = tokenizer_model_path(config.tokenizer)
    sp = load_sentencepiece(model_path)
    vocab_size, eod_id = sp.get_piece_size(), sp.eos_id()
    if eod_id < 0:
        raise UserInputError(f"tokenizer: {model_path} has no end-of-sentence piece to mark documents with.")
    # Imports megatron-core before the lock: under torch 2.3 that import forks torch inductor's compile
    # workers, which live as long as this process and would hold on to a lock opened before them.
    dtype = token_dtype(vocab_size)
    text_keys = tuple(config.text_keys)
    prefix = os.fspath(Path(config.output_prefix).absolute())
    with storage_errors_reported(prefix), output_lock(prefix, "data", leftovers=leftover_patterns(prefix)):
        record = _build_locked(config, prefix, model_path, vocab_size, eod_id, dtype, text_keys, workers)
    print(json.dumps({"output_prefix": prefix, "dtype": record["dtype"], "splits": record["splits"]}, indent=2))
    return record


def _build_locked(config: DataConfig, prefix: str, model_path: Path, vocab_size: int, eod_id: int,
                  dtype: type, text_keys: tuple[str, ...], workers: int) -> dict[str, Any]:
    # Pass 1: count documents (and surface corpus errors with file:line) to fix the split.
    num_documents = sum(1 for _ in tqdm(iter_documents(config.input, text_keys), desc="counting documents",
                                        unit=" docs", leave=False))
    if num_documents == 0:
        raise UserInputError(f"input: {config.input} has no non-empty text under keys {list(text_keys)}.")
    assignment = assign_splits(num_documents, config.split_percent, config.seed)

    token = f"{os.getpid()}-{os.urandom(4).hex()}"
    progress = tqdm(total=num_documents, desc=f"tokenizing {Path(prefix).name}", unit=" docs")
    pieces = _counted(encode_pieces(iter_documents(config.input, text_keys), model_path, dtype, workers),
                      progress)
    temps: dict[str, str] = {}
    sidecar_tmp = _temp_name(os.fspath(sidecar_path(prefix)), token)
    try:
        counts = _write_splits(prefix, pieces, assignment, dtype, token, temps)
        progress.close()
        if sum(c["documents"] for c in counts.values()) != num_documents:
            raise UserInputError(f"input: {config.input} changed while being read; run the stage again.")
        record = {
            "tokenizer_sha256": file_sha256(model_path),
            "tokenizer_dir": os.fspath(Path(config.tokenizer).absolute()),
            "vocab_size": vocab_size,
            "eod_id": eod_id,
            "dtype": np.dtype(dtype).name,
            "input": os.fspath(Path(config.input).absolute()),
            "splits": counts,
            "parameters": {
                "text_keys": list(text_keys),
                "split_percent": list(config.split_percent),
                "seed": config.seed,
                "split_method": "seeded permutation of document indices (numpy default_rng)",
                "append_eod": True,
                "megatron_core": _megatron_core_version(),
            },
        }
        # The old sidecar goes first: a crash between renames leaves no record, never a stale one.
        _cleanup([os.fspath(sidecar_path(prefix))])
        for final, temp in temps.items():
            make_readable(temp)
            os.replace(temp, final)
        record["files"] = _file_record(prefix)
        write_json(sidecar_tmp, record)
        os.replace(sidecar_tmp, sidecar_path(prefix))
    except BaseException:
        progress.close()
        _cleanup([*temps.values(), sidecar_tmp])
        raise
    return record


def _megatron_core_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return "unknown"


# --- checks and blends used by training and launch --------------------------------------------------------


def read_data_record(prefix: str | os.PathLike) -> dict[str, Any]:
    """The sidecar record of a dataset prefix, with a clear error when it is missing."""
    path = sidecar_path(prefix)
    if not path.is_file():
        raise DataMismatchError(
            f"data: {path} does not exist, so {prefix} was not built (completely) by `python -m dapt data`; "
            "run that stage with this --output-prefix."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def check_data_matches_tokenizer(prefix: str | os.PathLike,
                                 tokenizer_dir: str | os.PathLike) -> dict[str, Any]:
    """Refuse a dataset built with another tokenizer or whose files changed; return its record.

    Checks the sidecar's tokenizer SHA-256 against ``tokenizer_dir``'s ``tokenizer.model``,
    that every split's ``.bin``/``.idx`` exists, and that their size and index hash match the record.
    """
    record = read_data_record(prefix)
    model_path = tokenizer_model_path(tokenizer_dir)
    expected = file_sha256(model_path)
    if record.get("tokenizer_sha256") != expected:
        raise DataMismatchError(
            f"data: {prefix} was built with tokenizer {record.get('tokenizer_dir')} "
            f"(sha256 {str(record.get('tokenizer_sha256'))[:12]}...), not with {model_path} "
            f"(sha256 {expected[:12]}...); rebuild it with `python -m dapt data --tokenizer {tokenizer_dir}`."
        )
    for split in SPLITS:
        base = split_prefix(prefix, split)
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(base + suffix):
                raise DataMismatchError(f"data: {base + suffix} is missing; rebuild {prefix} (data stage).")
        files = record.get("files", {}).get(split, {})
        if files and (os.path.getsize(base + ".bin") != files["bin_bytes"]
                      or file_sha256(base + ".idx") != files["idx_sha256"]):
            raise DataMismatchError(
                f"data: {base}.bin/.idx differ from what {sidecar_path(prefix)} records (changed or replaced "
                "by hand); rebuild it with the data stage."
            )
    return record


def _weight(value: float) -> str:
    return format(value, ".6g")


def build_blend(domain_prefix: str | os.PathLike, general_prefix: str | os.PathLike | None,
                general_share: float = CHIPNEMO_GENERAL_SHARE) -> dict[str, list[str]]:
    """NeMo's ``model.data.data_prefix`` in its dict form: per split, ``[weight, path, weight, path]``.

    NeMo r2.0.0rc1 ``MegatronGPTModel.build_train_valid_test_datasets``
    (nemo/collections/nlp/models/language_modeling/megatron_gpt_model.py) passes a dict's
    ``train``/``validation``/``test`` lists to megatron-core's ``get_blend_from_list``
    (megatron/core/datasets/utils.py), which reads ``[w1, prefix1, w2, prefix2, ...]``;
    weights are relative sample shares. ``general_share`` is the replay share (ChipNeMo: about 9%).
    """
    if not 0.0 <= general_share < 1.0:
        raise UserInputError(f"general share {general_share} must be in [0, 1).")
    if general_share > 0 and general_prefix is None:
        raise UserInputError(
            f"a general (replay) share of {general_share} needs a general data prefix; "
            "pass one, or set the share to 0."
        )
    blend: dict[str, list[str]] = {}
    for split in SPLITS:
        parts = [_weight(1.0 - general_share), split_prefix(domain_prefix, split)]
        if general_share > 0:
            parts += [_weight(general_share), split_prefix(general_prefix, split)]
        blend[split] = parts
    return blend


def blend_fingerprint(blend: dict[str, list[str]]) -> str:
    """Short stable hash of a blend (for manifests)."""
    return hashlib.sha256(json.dumps(blend, sort_keys=True).encode()).hexdigest()[:16]


def iter_split_tokens(prefix: str | os.PathLike, split: str) -> Iterator[np.ndarray]:
    """Every document of one split as read back by megatron-core's ``IndexedDataset``.

    A split built with 0% has valid but empty files; megatron-core cannot memory-map an empty
    ``.bin`` (numpy refuses a zero-size map), so such a split yields nothing without opening it.
    """
    if os.path.getsize(split_prefix(prefix, split) + ".bin") == 0:
        return
    dataset = _indexed_dataset_module().IndexedDataset(split_prefix(prefix, split))
    for index in range(len(dataset)):
        yield dataset[index]
