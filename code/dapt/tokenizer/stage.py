"""The ``tokenizer`` stage: the ChipNeMo recipe's tokenizer adaptation, top to bottom.

:func:`adapt_tokenizer` reads like the recipe: train a domain tokenizer on the domain corpus (in a child
process, while the base model segments both corpora), find the candidates, select them with one of the
two methods, merge them into the base model, prune what is never produced, pad the vocabulary, and write
the SentencePiece model, the Hugging Face files, the token list, the report and its plots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dapt.artifacts import file_sha256, stage_output, write_json
from dapt.config import DEFAULT_GENERAL_DATA, DEFAULT_OUTPUTS, param
from dapt.corpus import DEFAULT_HELDOUT, find_jsonl_files
from dapt.tokenizer import guided_bpe
from dapt.tokenizer.candidates import find_candidates
from dapt.tokenizer.chipnemo import select_chipnemo
from dapt.tokenizer.chunked_encoding import ChunkEncoder
from dapt.tokenizer.corpus_passes import StreamedCorpus, adapted_pass, base_pass, training_lines
from dapt.tokenizer.domain_tokenizer import LLAMA2_TRAINER_SETTINGS, DomainTrainer
from dapt.tokenizer.extend import extend_model, pad_vocabulary
from dapt.tokenizer.hf_files import write_hf_tokenizer
from dapt.tokenizer.reachability import prune_unused, reachability
from dapt.tokenizer.sentencepiece_model import TOKENIZER_FILE, TokenizerError, load_proto, resolve_sp_model

DOMAIN_TOKENS_FILE = "domain_tokens.json"


@dataclass
class TokenizerConfig:
    """Parameters of the tokenizer adaptation (``python -m dapt tokenizer``)."""

    base_tokenizer: Path = param(DEFAULT_OUTPUTS / "tiny" / "base_tokenizer",
                                 "base SentencePiece model, or a model folder holding tokenizer.model")
    domain_data: Path = param(DEFAULT_GENERAL_DATA.parent / "data", "domain JSONL corpus (any folder depth)")
    general_data: Path = param(DEFAULT_GENERAL_DATA, "general JSONL corpus (any folder depth)")
    output: Path = param(DEFAULT_OUTPUTS / "tiny" / "tokenizer", "output folder")
    method: Literal["guided-bpe", "chipnemo"] = param("guided-bpe", "how domain tokens join the base model")
    domain_vocab_size: int = param(16000, "vocabulary size of the domain SentencePiece tokenizer")
    occur_limit: int = param(3, "candidates may occur in at most this many general documents")
    freq_threshold: float = param(0.98, "keep the most used new tokens up to this share of all their uses")
    max_added_tokens: int | None = param(None, "cap on added tokens before padding (default: no cap)")
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
    workers: int = param(2, "processes: with 2 the domain tokenizer trains in a child process meanwhile")


def _validate(config: TokenizerConfig) -> None:
    checks = [
        (config.domain_vocab_size >= 100, "domain_vocab_size must be at least 100"),
        (0 < config.freq_threshold <= 1, "freq_threshold must be in (0, 1]"),
        (config.occur_limit >= 0, "occur_limit must be >= 0"),
        (config.max_added_tokens is None or config.max_added_tokens > 0, "max_added_tokens must be positive"),
        (config.max_tensor_parallel >= 1, "max_tensor_parallel must be >= 1"),
        (config.min_reserved >= 0, "min_reserved must be >= 0"),
        (config.general_penalty >= 0 and config.guide_bonus >= 0, "general_penalty and guide_bonus must be >= 0"),
        (config.max_training_lines >= 1, "max_training_lines must be >= 1"),
        (config.workers >= 1, "workers must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise TokenizerError(f"bad parameter: {message}.")


class _StageClock:
    """Wall and CPU seconds per stage of this process."""

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
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _preload_matplotlib() -> None:
    """Import the plotting library (half a second of CPU) while the main process waits for the training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def adapt_tokenizer(config: TokenizerConfig) -> Path:
    """Run the whole adaptation and write the tokenizer folder; returns its path.

    The corpora are streamed in batches: memory stays bounded by the batch size, the
    training-line cap and the distinct words, not by the corpus size.
    """
    from dapt.tokenizer import plots
    from dapt.tokenizer import report as tokenizer_report

    _validate(config)
    clock = _StageClock()
    children_cpu = _children_cpu()
    base_path = resolve_sp_model(config.base_tokenizer)
    base = load_proto(base_path)
    base_vocab = {p.piece for p in base.pieces}
    for path in (config.domain_data, config.general_data):
        find_jsonl_files(path)  # a missing or empty folder fails before any work
    domain = StreamedCorpus(config.domain_data, "domain", config.text_keys, mask=True)
    general = StreamedCorpus(config.general_data, "general", config.text_keys, mask=False)
    guided = config.method == "guided-bpe"

    lines = training_lines(domain, config.max_training_lines)
    clock.lap("read domain data")
    settings = dict(LLAMA2_TRAINER_SETTINGS, character_coverage=base.trainer_spec.character_coverage or 0.99995)
    trainer = DomainTrainer(lines.result(), config.domain_vocab_size, settings, config.workers)
    try:  # while the domain tokenizer trains: everything that needs only the base model
        encoder = ChunkEncoder(base)
        words = {name: guided_bpe.WordCounter(encoder.pieces) if guided else None for name in ("domain", "general")}
        before = {"domain": base_pass(domain, encoder, words["domain"])}
        clock.lap("domain pass (base segmentation)")
        before["general"] = base_pass(general, encoder, words["general"])
        del encoder
        clock.lap("general pass (base segmentation)")
        pairs = guided_bpe.pair_statistics(words["domain"].counts, words["general"].counts) if guided else None
        del words
        clock.lap("pair statistics")
        if trainer.running():
            _preload_matplotlib()
            clock.lap("import matplotlib")
        domain_model = trainer.result()
    finally:
        trainer.close()
    clock.lap("train domain tokenizer (wait)")
    candidates = find_candidates(domain_model, base_vocab, general.texts(), config.occur_limit)
    clock.lap("candidates")
    if not candidates.pieces:
        raise TokenizerError(
            f"no candidate domain tokens: every piece of the {config.domain_vocab_size}-piece domain tokenizer is "
            f"in the base vocabulary or frequent in {config.general_data}; raise --domain-vocab-size or --occur-limit."
        )
    if guided:
        selection = guided_bpe.select_guided_bpe(
            base, candidates, pairs, config.freq_threshold, config.max_added_tokens,
            config.general_penalty, config.min_domain_count, config.guide_bonus)
    else:
        selection = select_chipnemo(base, candidates, domain, config.freq_threshold, config.max_added_tokens)
    del pairs
    clock.lap("select tokens")

    first_new = len(base.pieces)
    model = extend_model(base, selection.pieces, selection.piece_type)
    produced, domain_stats = adapted_pass(domain, ChunkEncoder(model), first_new, before["domain"])
    pieces = prune_unused(model, first_new, selection.pieces, produced, selection.piece_type)
    if len(pieces) != len(selection.pieces):
        model = extend_model(base, pieces, selection.piece_type)
        produced, domain_stats = adapted_pass(domain, ChunkEncoder(model), first_new, before["domain"])
    reach = reachability(model, first_new, len(pieces), produced)
    added_count = len(pieces)
    reserved = pad_vocabulary(model, config.max_tensor_parallel, config.min_reserved)
    _, general_stats = adapted_pass(general, ChunkEncoder(model), len(model.pieces), before["general"])
    clock.lap("merge, prune, pad (adapted segmentation)")

    inputs = {
        "base_tokenizer": {"path": str(base_path), "sha256": file_sha256(base_path)},
        "domain_data": domain.counter.summary(),
        "general_data": general.counter.summary(),
    }
    with stage_output(config.output, "tokenizer", config, inputs) as tmp:
        (tmp / TOKENIZER_FILE).write_bytes(model.SerializeToString())
        (tmp / "domain_tokenizer.model").write_bytes(domain_model.SerializeToString())
        write_hf_tokenizer(tmp)
        write_json(tmp / DOMAIN_TOKENS_FILE, {
            "base_vocab_size": len(base.pieces),
            "vocab_size": len(model.pieces),
            "method": config.method,
            "tokens": [
                {"token": p, "id": len(base.pieces) + k, "kind": "domain",
                 "domain_count": int(selection.domain_use.get(p, 0))}
                for k, p in enumerate(pieces)
            ] + [
                {"token": model.pieces[i].piece, "id": i, "kind": "reserved", "domain_count": 0}
                for i in range(len(base.pieces) + added_count, len(model.pieces))
            ],
        })
        clock.lap("write files")
        report = tokenizer_report.build_report(
            base=base, adapted=model, folder=tmp,
            train={"domain_train": domain_stats, "general_train": general_stats},
            heldout={"domain_heldout": config.heldout_domain, "general_heldout": config.heldout_general},
            text_keys=config.text_keys,
        )
        report.update({
            "method": config.method,
            "base_vocab_size": len(base.pieces),
            "added_tokens": added_count,
            "reserved_tokens": reserved,
            "vocab_size": len(model.pieces),
            "vocab_multiple": 128 * config.max_tensor_parallel,
            "candidates": {"kept": len(candidates.pieces), "dropped": candidates.dropped},
            "selection": selection.details,
            "reachability": reach,
        })
        clock.lap("report")
        report["training_lines"] = {"seen": lines.seen, "used": len(lines.result())}
        plots.plot_cumulative_use(selection.domain_use, config.freq_threshold, tmp / "cumulative_use.png")
        plots.plot_compression(report, tmp / "compression_by_file_type.png")
        clock.lap("plots")
        report["seconds"] = clock.wall
        report["cpu_seconds"] = dict(clock.cpu, **{
            "train domain tokenizer (child process)": round(_children_cpu() - children_cpu, 2)})
        write_json(tmp / "report.json", report)
    print(tokenizer_report.summary_line(report, config.output))
    return Path(config.output)


