"""The ``tokenizer`` stage: the ChipNeMo recipe's tokenizer adaptation, top to bottom.

:func:`adapt_tokenizer` reads like the recipe: train a domain tokenizer on the domain corpus (in a worker,
while the others segment both corpora with the base model), find the candidates, select them with one of
the two methods, merge them into the base model, prune what is never produced, pad the vocabulary, and
write the SentencePiece model, the Hugging Face files, the token list, the report and its plots.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dapt.artifacts import file_sha256, stage_output, write_json
from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.config import DEFAULT_DOMAIN_DATA, DEFAULT_GENERAL_DATA, DEFAULT_OUTPUTS, param
from dapt.corpus import DEFAULT_HELDOUT, find_jsonl_files
from dapt.tokenizer import guided_bpe
from dapt.tokenizer.candidates import Candidates, Selection, find_candidates
from dapt.tokenizer.chipnemo import select_chipnemo
from dapt.tokenizer.corpus_passes import (
    Pool,
    StreamedCorpus,
    adapted_pass,
    base_pass,
    document_frequency,
    training_lines,
)
from dapt.tokenizer.domain_tokenizer import LLAMA2_TRAINER_SETTINGS, MIN_VOCAB_SIZE, WHY_MIN, TrainDomainTokenizer
from dapt.tokenizer.extend import extend_model, pad_vocabulary
from dapt.tokenizer.hf_files import write_hf_tokenizer
from dapt.tokenizer.reachability import prune_unused, reachability
from dapt.tokenizer.sentencepiece_model import TOKENIZER_FILE, TokenizerError, load_proto, parse_proto, resolve_sp_model
from dapt.tokenizer.workers import available_cores, open_pool

DOMAIN_TOKENS_FILE = "domain_tokens.json"


@dataclass
class TokenizerConfig:
    """Parameters of the tokenizer adaptation (``python -m dapt tokenizer``); the defaults are the tiny
    profile's (the notebook's values on the embedded sample)."""

    base_tokenizer: Path = param(DEFAULT_OUTPUTS / "tiny" / "base_tokenizer",
                                 "base SentencePiece model, or a model folder holding tokenizer.model")
    domain_data: Path = param(DEFAULT_DOMAIN_DATA, "domain JSONL corpus (any folder depth)")
    general_data: Path = param(DEFAULT_GENERAL_DATA, "general JSONL corpus (any folder depth)")
    output: Path = param(DEFAULT_OUTPUTS / "tiny" / "tokenizer", "output folder")
    method: Literal["guided-bpe", "chipnemo"] = param("guided-bpe", "how domain tokens join the base model")
    domain_vocab_size: int = param(4000, "vocabulary size of the domain SentencePiece tokenizer")
    occur_limit: int = param(3, "candidates may occur in at most this many general documents")
    freq_threshold: float = param(0.98, "keep the most used new tokens up to this share of all their uses")
    max_added_tokens: int | None = param(1024, "cap on added tokens before padding (None: no cap)")
    general_penalty: float = param(4.0, "guided-bpe: a merge's general-text count is weighted by this")
    guide_bonus: float = param(1.0, "guided-bpe: score bonus for pieces the domain tokenizer proposes")
    min_domain_count: int = param(3, "guided-bpe: a merge must occur at least this often in the domain data")
    max_tensor_parallel: int = param(8, "pad the vocabulary to a multiple of 128 x this")
    min_reserved: int = param(3, "at least this many reserved tokens for later fine-tuning")
    text_keys: tuple[str, ...] = param(("text",), "JSON keys that may hold the text")
    heldout_domain: Path | None = param(DEFAULT_HELDOUT / "domain", "held-out domain JSONL for the report")
    heldout_general: Path | None = param(DEFAULT_HELDOUT / "general", "held-out general JSONL for the report")
    max_training_lines: int = param(
        1_000_000, "cap on the domain tokenizer's training lines (a fixed hash-chosen sample beyond it)")
    workers: int = param(0, "worker processes for the corpus passes and the domain tokenizer's training "
                            "(0: one per available core; 1: all in this process); outputs do not depend on it")


def _validate(config: TokenizerConfig) -> None:
    """Refuse numbers that cannot work, naming the option and the value given."""
    checks = [
        ("domain_vocab_size", config.domain_vocab_size >= MIN_VOCAB_SIZE, f"at least {MIN_VOCAB_SIZE} {WHY_MIN}"),
        ("occur_limit", config.occur_limit >= 0, "0 or more"),
        ("freq_threshold", 0 < config.freq_threshold <= 1, "above 0 and at most 1"),
        ("max_added_tokens", config.max_added_tokens is None or config.max_added_tokens >= 1,
         "at least 1 (or None for no cap)"),
        ("general_penalty", math.isfinite(config.general_penalty) and config.general_penalty >= 0,
         "a finite number, 0 or more"),
        ("guide_bonus", math.isfinite(config.guide_bonus) and config.guide_bonus >= 0, "a finite number, 0 or more"),
        ("min_domain_count", config.min_domain_count >= 0, "0 or more"),
        ("max_tensor_parallel", config.max_tensor_parallel >= 1, "at least 1"),
        ("min_reserved", config.min_reserved >= 0, "0 or more"),
        ("max_training_lines", config.max_training_lines >= 1, "at least 1"),
        ("workers", config.workers >= 0, "0 (one per core) or more"),
    ]
    for name, ok, wanted in checks:
        if not ok:
            value = getattr(config, name)
            raise TokenizerError(f"--{name.replace('_', '-')} {value}: must be {wanted}.")
    if not config.text_keys:
        raise TokenizerError("--text-keys: name at least one JSON key.")


class _StageClock:
    """Wall and CPU seconds per step of this process."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[name] = round(wall - self._wall, 2)
        self.cpu[name] = round(cpu - self._cpu, 2)
        self._wall, self._cpu = wall, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _preload_matplotlib() -> None:
    """Import the plotting library (half a second of CPU) while the stage waits for the training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


@dataclass
class _Adapted:
    """What the merge steps produced: the padded model, the added pieces, and the measurements."""

    model: sp_pb2.ModelProto
    pieces: list[str]
    reserved: int
    reach: dict
    domain_stats: dict
    general_stats: dict


def adapt_tokenizer(config: TokenizerConfig) -> Path:
    """Run the whole adaptation and write the tokenizer folder; returns its path.

    The corpora are streamed in batches through ``config.workers`` processes: memory stays bounded by the
    batch size, the training-line cap and the distinct words, not by the corpus size.
    """
    _validate(config)
    clock = _StageClock()
    children_cpu = _children_cpu()
    base_path = resolve_sp_model(config.base_tokenizer)
    base = load_proto(base_path)
    for path in (config.domain_data, config.general_data):
        find_jsonl_files(path)  # a missing or empty folder fails before any work
    domain = StreamedCorpus(config.domain_data, "domain", config.text_keys, mask=True)
    general = StreamedCorpus(config.general_data, "general", config.text_keys, mask=False)
    guided = config.method == "guided-bpe"
    first_new = len(base.pieces)

    with open_pool(config.workers or available_cores()) as pool:
        # 1. the domain tokenizer trains on the domain lines while the base model segments both corpora
        lines = training_lines(domain, pool, config.max_training_lines)
        clock.lap("read domain data")
        settings = dict(LLAMA2_TRAINER_SETTINGS, character_coverage=base.trainer_spec.character_coverage or 0.99995)
        training = {"seen": lines.seen, "used": len(lines.result())}
        pool.start_long("train", TrainDomainTokenizer(lines.result(), config.domain_vocab_size, settings))
        del lines  # the worker has them
        before_domain, domain_words = base_pass(domain, pool, base, count_words=guided)
        clock.lap("domain pass (base segmentation)")
        before_general, general_words = base_pass(general, pool, base, count_words=guided)
        clock.lap("general pass (base segmentation)")
        pairs = guided_bpe.pair_statistics(domain_words, general_words) if guided else None
        del domain_words, general_words
        clock.lap("pair statistics")
        if not pool.long_done("train"):
            _preload_matplotlib()
            clock.lap("import matplotlib")
        domain_model = parse_proto(pool.wait_long("train"))
        clock.lap("train domain tokenizer (wait)")

        # 2. candidates: the domain pieces the base lacks that general text rarely uses
        base_vocab = {p.piece for p in base.pieces}
        candidates = find_candidates(domain_model, base_vocab, lambda pieces: document_frequency(general, pool, pieces),
                                     config.occur_limit)
        clock.lap("candidates")
        if not candidates.pieces:
            raise TokenizerError(
                f"no candidate domain tokens: every piece of the {config.domain_vocab_size}-piece domain tokenizer "
                f"is in the base vocabulary or frequent in {config.general_data}; "
                "raise --domain-vocab-size or --occur-limit.")

        # 3. select with one of the two methods
        if guided:
            selection = guided_bpe.select_guided_bpe(
                base, candidates, pairs, config.freq_threshold, config.max_added_tokens,
                config.general_penalty, config.min_domain_count, config.guide_bonus)
        else:
            selection = select_chipnemo(base, candidates, lambda model: adapted_pass(domain, pool, model, first_new)[0],
                                        config.freq_threshold, config.max_added_tokens)
        del pairs
        clock.lap("select tokens")

        # 4-5. merge, prune what SentencePiece never produces, check reachability, pad
        adapted = _merge_prune_pad(base, selection, domain, general, pool, (before_domain, before_general), config)
        clock.lap("merge, prune, pad (adapted segmentation)")
    workers_cpu = round(_children_cpu() - children_cpu, 2)

    # 6-7. write the folder: SentencePiece and HF files, the token list, the report and its plots
    inputs = {
        "base_tokenizer": {"path": str(base_path), "sha256": file_sha256(base_path)},
        "domain_data": domain.counter.summary(),
        "general_data": general.counter.summary(),
    }
    with stage_output(config.output, "tokenizer", config, inputs) as tmp:
        _write_folder(tmp, base, domain_model, adapted, selection, candidates, config, clock)
        report = _write_report(tmp, base, adapted, selection, candidates, training, config, clock, workers_cpu)
    from dapt.tokenizer import report as tokenizer_report

    print(tokenizer_report.summary_line(report, config.output))
    return Path(config.output)


def _merge_prune_pad(base: sp_pb2.ModelProto, selection: Selection, domain: StreamedCorpus,
                     general: StreamedCorpus, pool: Pool, before: tuple[list[int], list[int]],
                     config: TokenizerConfig) -> _Adapted:
    """Steps 4-5: the base model plus the selection, without pieces the domain data never produces, padded."""
    first_new = len(base.pieces)
    model = extend_model(base, selection.pieces, selection.piece_type)
    produced, domain_stats = adapted_pass(domain, pool, model, first_new, before[0])
    pieces = prune_unused(model, first_new, selection.pieces, produced, selection.piece_type)
    if len(pieces) != len(selection.pieces):
        model = extend_model(base, pieces, selection.piece_type)
        produced, domain_stats = adapted_pass(domain, pool, model, first_new, before[0])
    reach = reachability(model, first_new, len(pieces), produced)
    reserved = pad_vocabulary(model, config.max_tensor_parallel, config.min_reserved)
    _, general_stats = adapted_pass(general, pool, model, len(model.pieces), before[1])
    return _Adapted(model, pieces, reserved, reach, domain_stats, general_stats)


def _write_folder(tmp: Path, base: sp_pb2.ModelProto, domain_model: sp_pb2.ModelProto, adapted: _Adapted,
                  selection: Selection, candidates: Candidates, config: TokenizerConfig, clock: _StageClock) -> None:
    """The SentencePiece models, the HF files and ``domain_tokens.json``."""
    model, first_new = adapted.model, len(base.pieces)
    (tmp / TOKENIZER_FILE).write_bytes(model.SerializeToString())
    (tmp / "domain_tokenizer.model").write_bytes(domain_model.SerializeToString())
    write_hf_tokenizer(tmp)
    write_json(tmp / DOMAIN_TOKENS_FILE, {
        "base_vocab_size": first_new,
        "vocab_size": len(model.pieces),
        "method": config.method,
        "tokens": [
            {"token": p, "id": first_new + k, "kind": "domain", "domain_count": int(selection.domain_use.get(p, 0))}
            for k, p in enumerate(adapted.pieces)
        ] + [
            {"token": model.pieces[i].piece, "id": i, "kind": "reserved", "domain_count": 0}
            for i in range(first_new + len(adapted.pieces), len(model.pieces))
        ],
    })
    clock.lap("write files")


def _write_report(tmp: Path, base: sp_pb2.ModelProto, adapted: _Adapted, selection: Selection,
                  candidates: Candidates, training: dict, config: TokenizerConfig, clock: _StageClock,
                  workers_cpu: float) -> dict:
    """``report.json`` (held-out corpora measured here) and the plots."""
    from dapt.tokenizer import plots
    from dapt.tokenizer import report as tokenizer_report

    report = tokenizer_report.build_report(
        base=base, adapted=adapted.model, folder=tmp,
        train={"domain_train": adapted.domain_stats, "general_train": adapted.general_stats},
        heldout={"domain_heldout": config.heldout_domain, "general_heldout": config.heldout_general},
        text_keys=config.text_keys,
    )
    report.update({
        "method": config.method,
        "base_vocab_size": len(base.pieces),
        "added_tokens": len(adapted.pieces),
        "reserved_tokens": adapted.reserved,
        "vocab_size": len(adapted.model.pieces),
        "vocab_multiple": 128 * config.max_tensor_parallel,
        "candidates": {"kept": len(candidates.pieces), "dropped": candidates.dropped},
        "selection": selection.details,
        "reachability": adapted.reach,
    })
    clock.lap("report")
    report["training_lines"] = training
    plots.plot_cumulative_use(selection, adapted.pieces, config.freq_threshold, config.max_added_tokens,
                              config.method, tmp / "cumulative_use.png")
    plots.plot_compression(report, tmp / "compression_by_file_type.png")
    clock.lap("plots")
    report["seconds"] = clock.wall
    report["cpu_seconds"] = dict(clock.cpu, **{"worker processes (passes and training)": workers_cpu})
    write_json(tmp / "report.json", report)
    return report
