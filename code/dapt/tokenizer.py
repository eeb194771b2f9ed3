"""Domain-adapted tokenizer: train a domain SentencePiece model, pick the domain tokens Llama 2 lacks,
merge them into the base model, pad for tensor parallelism, and write SentencePiece + HF files.

Two merge methods:

* ``guided-bpe`` (default): new NORMAL pieces learned as continued BPE merges over the base
  model's own segmentation of the domain data, scored by domain use minus a penalty for general
  use, with a bonus for pieces the trained domain tokenizer proposes. Every new piece is reachable,
  no text gets longer, and transformers' fast tokenizer gives the same ids as SentencePiece.
* ``chipnemo``: the original recipe with its defects fixed: the domain tokenizer's pieces that
  contain a letter, are absent from the base vocabulary and occur in at most ``occur_limit`` general
  documents, extended as USER_DEFINED pieces, and the most used ones kept up to ``freq_threshold``
  of all uses (a correct cumulative cut).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import sentencepiece as spm

from dapt import guided_bpe
from dapt.artifacts import file_sha256, stage_output, write_json
from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.config import DEFAULT_GENERAL_DATA, DEFAULT_OUTPUTS, param
from dapt.corpus import DEFAULT_HELDOUT, Corpus, load_corpus, looks_like_blob, mask_blobs
from dapt.errors import UserInputError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
RESERVED_TEMPLATE = "<extra_id_{}>"
TOKENIZER_FILE = "tokenizer.model"
DOMAIN_TOKENS_FILE = "domain_tokens.json"

# Llama 2's SentencePiece trainer settings, read from the real model's trainer_spec
# (../shared/models/llama2-tokenizer/tokenizer.model); tests compare them with it.
LLAMA2_TRAINER_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.99995,
    "split_digits": True,
    "byte_fallback": True,
    "allow_whitespace_only_pieces": True,
    "split_by_unicode_script": True,
    "split_by_number": True,
    "split_by_whitespace": True,
    "treat_whitespace_as_suffix": False,
    "max_sentencepiece_length": 16,
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "normalization_rule_name": "identity",
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
}


class TokenizerError(UserInputError):
    """A tokenizer file or parameter cannot be used."""


# --- SentencePiece model files ---------------------------------------------------------------------


def resolve_sp_model(path: str | Path) -> Path:
    """A SentencePiece model file, given the file or a folder holding ``tokenizer.model``."""
    path = Path(path)
    candidate = path / TOKENIZER_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise TokenizerError(
            f"no SentencePiece model at {path}: pass a .model file or a model folder holding {TOKENIZER_FILE} "
            "(for example a Llama-2-7b-hf download)."
        )
    return candidate


def load_proto(path: str | Path) -> sp_pb2.ModelProto:
    """Parse a SentencePiece model file into its protobuf."""
    model = sp_pb2.ModelProto()
    path = resolve_sp_model(path)
    try:
        model.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf raises DecodeError, a plain Exception subclass
        raise TokenizerError(f"{path} is not a SentencePiece model ({error}).") from None
    if not model.pieces:
        raise TokenizerError(f"{path} is not a SentencePiece model (no pieces).")
    return model


def processor(model: sp_pb2.ModelProto) -> spm.SentencePieceProcessor:
    """A SentencePiece processor for an in-memory model."""
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


def without_dummy_prefix(model: sp_pb2.ModelProto) -> spm.SentencePieceProcessor:
    """A processor that encodes a piece's surface text as it appears inside a text (no leading '▁' added)."""
    copy = sp_pb2.ModelProto()
    copy.CopyFrom(model)
    copy.normalizer_spec.add_dummy_prefix = False
    return processor(copy)


def surface(piece: str) -> str:
    """The text a piece stands for ('▁' is a space)."""
    return piece.replace("▁", " ")


_CHUNK = re.compile(r" +[^ ]*|[^ ]+")


def chunk_safe(model: sp_pb2.ModelProto) -> bool:
    """True when encoding a text equals encoding its space-delimited chunks one by one.

    That holds when the normaliser is the identity and keeps spaces, and no piece
    holds a space ('▁') after another character: then no piece can span the start
    of a run of spaces, so chunks starting there are independent.
    """
    spec = model.normalizer_spec
    if spec.name != "identity" or spec.remove_extra_whitespaces or model.trainer_spec.treat_whitespace_as_suffix:
        return False
    return not any(re.search(r"[^▁]▁", p.piece) for p in model.pieces)


def encode_texts(model: sp_pb2.ModelProto, texts: list[str]) -> list[list[int]]:
    """SentencePiece ids of many texts, each distinct space-delimited chunk encoded once.

    Gives exactly what ``SentencePieceProcessor.encode`` gives (see :func:`chunk_safe`;
    other models are encoded whole), several times faster on real corpora, where
    most chunks repeat.
    """
    if not chunk_safe(model):
        return processor(model).encode(texts, num_threads=2)
    prefix = " " if model.normalizer_spec.add_dummy_prefix else ""
    chunked = []
    for text in texts:
        chunks = _CHUNK.findall(text)
        if chunks:
            chunks[0] = prefix + chunks[0]
        chunked.append(chunks)
    unique = list({c for chunks in chunked for c in chunks})
    encoded = without_dummy_prefix(model).encode(unique, num_threads=2)
    table = dict(zip(unique, encoded))
    result = []
    for chunks in chunked:
        ids: list[int] = []
        for chunk in chunks:
            ids.extend(table[chunk])
        result.append(ids)
    return result


# --- training --------------------------------------------------------------------------------------


def _training_lines(texts: list[str]) -> list[str]:
    """SentencePiece trains on lines: split documents, drop blank lines."""
    return [line for text in texts for line in text.split("\n") if line.strip()]


def train_sentencepiece(texts: list[str], vocab_size: int, settings: dict, threads: int = 2) -> sp_pb2.ModelProto:
    """Train a SentencePiece model in memory on the lines of ``texts``."""
    lines = _training_lines(texts)
    if not lines:
        raise TokenizerError("no training text: the corpus holds only blank lines.")
    buffer = _BytesSink()
    options = {k: v for k, v in settings.items() if k not in ("add_dummy_prefix", "remove_extra_whitespaces")}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buffer,
            vocab_size=vocab_size,
            num_threads=threads,
            max_sentence_length=16384,
            add_dummy_prefix=settings.get("add_dummy_prefix", True),
            remove_extra_whitespaces=settings.get("remove_extra_whitespaces", False),
            minloglevel=2,
            **options,
        )
    except RuntimeError as error:
        raise TokenizerError(f"SentencePiece training failed with vocab_size={vocab_size}: {error}") from None
    model = sp_pb2.ModelProto()
    model.ParseFromString(buffer.data)
    return model


class _BytesSink:
    """Receives the trained model from SentencePiece instead of a file."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


@dataclass
class BaseTokenizerConfig:
    """The tiny profile's miniature base tokenizer: Llama 2's trainer settings on the general sample."""

    general_data: Path = param(DEFAULT_GENERAL_DATA, "general JSONL corpus to train on")
    output: Path = param(DEFAULT_OUTPUTS / "tiny" / "base_tokenizer", "output folder")
    vocab_size: int = param(2048, "vocabulary size of the miniature base")
    text_keys: tuple[str, ...] = param(("text",), "JSON keys that may hold the text")


def train_base_tokenizer(config: BaseTokenizerConfig) -> Path:
    """Train the miniature base tokenizer and write ``tokenizer.model`` into the output folder."""
    corpus = load_corpus(config.general_data, "general", config.text_keys)
    inputs = {"general_data": corpus.summary()}
    with stage_output(config.output, "base-tokenizer", config, inputs) as tmp:
        model = train_sentencepiece([d.text for d in corpus.documents], config.vocab_size, LLAMA2_TRAINER_SETTINGS)
        (tmp / TOKENIZER_FILE).write_bytes(model.SerializeToString())
    print(f"base tokenizer: {config.vocab_size} pieces -> {Path(config.output) / TOKENIZER_FILE}")
    return Path(config.output) / TOKENIZER_FILE


# --- candidates ------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """Domain pieces the base lacks, with why the others were dropped."""

    pieces: list[str]
    general_doc_freq: dict[str, int]
    dropped: dict[str, int]


def general_document_frequency(pieces: list[str], general: Corpus) -> Counter:
    """In how many general documents each piece occurs as a substring, in one pass over the corpus.

    Text is compared in SentencePiece's normalised form (spaces as '▁', a leading
    '▁'), so a piece matches wherever SentencePiece could see it. One Aho-Corasick
    automaton scans each document once, whatever the number of pieces.
    """
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for index, piece in enumerate(pieces):
        automaton.add_word(piece, index)
    automaton.make_automaton()
    doc_freq: Counter = Counter()
    for doc in general.documents:
        normalised = "▁" + doc.text.replace(" ", "▁")
        doc_freq.update({pieces[index] for _, index in automaton.iter(normalised)})
    return doc_freq


def find_candidates(
    domain_model: sp_pb2.ModelProto,
    base_vocab: set[str],
    general: Corpus,
    occur_limit: int,
    require_letter: bool = True,
) -> Candidates:
    """Domain pieces absent from the base, not blob fragments, occurring in at most ``occur_limit`` general docs."""
    dropped: Counter = Counter()
    shaped = []
    for entry in domain_model.pieces:
        piece = entry.piece
        reason = None
        if entry.type != NORMAL:
            reason = "special"
        elif piece in base_vocab:
            reason = "in base vocabulary"
        elif len(piece.strip("▁")) == 0:
            reason = "whitespace only"
        elif require_letter and not any(c.isalpha() for c in piece):
            reason = "no letter"
        elif looks_like_blob(piece):
            reason = "blob fragment"
        if reason:
            dropped[reason] += 1
        else:
            shaped.append(piece)
    doc_freq = general_document_frequency(shaped, general) if shaped else Counter()
    kept = [p for p in shaped if doc_freq[p] <= occur_limit]
    if len(kept) < len(shaped):
        dropped["frequent in general data"] = len(shaped) - len(kept)
    return Candidates(pieces=kept, general_doc_freq={p: doc_freq[p] for p in kept}, dropped=dict(dropped))


def cumulative_cut(counts: list[int], threshold: float) -> int:
    """Smallest k such that the k largest counts reach ``threshold`` of the total (counts sorted descending)."""
    total = sum(counts)
    if total == 0:
        return 0
    cumulative = np.cumsum(np.asarray(counts, dtype=np.float64)) / total
    return int(min(np.searchsorted(cumulative, threshold - 1e-12) + 1, len(counts)))


# --- building models -------------------------------------------------------------------------------


def extend_model(base: sp_pb2.ModelProto, pieces: list[str], piece_type: int) -> sp_pb2.ModelProto:
    """The base model plus ``pieces`` appended in order.

    NORMAL pieces are scored below every base piece and strictly decreasing, with
    scores that stay distinct in float32 (SentencePiece and the HF converter order
    merges by score).
    """
    model = sp_pb2.ModelProto()
    model.CopyFrom(base)
    floor = min(p.score for p in base.pieces)
    step = max(1.0, abs(floor) * 1e-6)
    existing = {p.piece for p in base.pieces}
    for rank, piece in enumerate(pieces, start=1):
        if piece in existing:
            raise TokenizerError(f"piece {piece!r} is already in the base vocabulary")
        entry = model.pieces.add()
        entry.piece = piece
        entry.type = piece_type
        entry.score = floor - step * rank if piece_type == NORMAL else 0.0
    scores = np.asarray([p.score for p in model.pieces[len(base.pieces):]], dtype=np.float32)
    if piece_type == NORMAL and len(scores) > 1 and not np.all(np.diff(scores) < 0):
        raise TokenizerError("new piece scores collide in float32; too many pieces for this base")
    return model


def pad_vocabulary(model: sp_pb2.ModelProto, max_tensor_parallel: int, min_reserved: int) -> int:
    """Append reserved CONTROL pieces until the size is a multiple of 128 x max TP (at least ``min_reserved``)."""
    multiple = 128 * max_tensor_parallel
    size = len(model.pieces) + min_reserved
    target = -(-size // multiple) * multiple
    existing = {p.piece for p in model.pieces}
    index = 0
    added = 0
    while len(model.pieces) < target:
        name = RESERVED_TEMPLATE.format(index)
        index += 1
        if name in existing:
            continue
        entry = model.pieces.add()
        entry.piece, entry.type, entry.score = name, CONTROL, 0.0
        added += 1
    return added


# --- the two methods -------------------------------------------------------------------------------


@dataclass
class Selection:
    """The pieces a method adds (in id order), their domain use, and method-specific facts."""

    pieces: list[str]
    piece_type: int
    domain_use: dict[str, int]
    details: dict


def select_chipnemo(
    base: sp_pb2.ModelProto, candidates: Candidates, domain_texts: list[str], threshold: float,
    max_added: int | None,
) -> Selection:
    """The original recipe, fixed: extend with all candidates as USER_DEFINED, keep the most used."""
    extended = extend_model(base, candidates.pieces, USER_DEFINED)
    first_new = len(base.pieces)
    uses: Counter = Counter()
    for ids in encode_texts(extended, domain_texts):
        uses.update(i for i in ids if i >= first_new)
    ranked = sorted(((uses[first_new + k], p) for k, p in enumerate(candidates.pieces) if uses[first_new + k] > 0),
                    key=lambda item: (-item[0], item[1]))
    keep = cumulative_cut([count for count, _ in ranked], threshold)
    if max_added is not None:
        keep = min(keep, max_added)
    chosen = ranked[:keep]
    return Selection(
        pieces=[p for _, p in chosen],
        piece_type=USER_DEFINED,
        domain_use={p: c for c, p in chosen},
        details={"used_candidates": len(ranked), "kept_by_threshold": keep},
    )


def select_guided_bpe(
    base: sp_pb2.ModelProto, candidates: Candidates, domain_before: list[list[int]],
    general_before: list[list[int]], config: TokenizerConfig,
) -> Selection:
    """Continued BPE over the base segmentation (given as ids), guided by the domain tokenizer's candidates."""
    table = [p.piece for p in base.pieces]
    vocab = set(table)
    started = time.perf_counter()

    def as_pieces(all_ids: list[list[int]]) -> list[list[str]]:
        return [[table[i] for i in ids] for ids in all_ids]

    domain_words = guided_bpe.count_words(as_pieces(domain_before), vocab)
    general_words = guided_bpe.count_words(as_pieces(general_before), vocab)
    guide = {c[i:j] for c in candidates.pieces for i in range(len(c)) for j in range(i + 2, len(c) + 1)}
    budget = config.max_added_tokens or len(candidates.pieces)
    result = guided_bpe.learn_merges(
        domain_words, general_words, vocab, max_merges=budget,
        general_penalty=config.general_penalty, min_domain_count=config.min_domain_count,
        guide=guide, guide_bonus=config.guide_bonus, split_digits=base.trainer_spec.split_digits,
    )
    kept = guided_bpe.select_by_use(result, config.freq_threshold, config.max_added_tokens)
    candidate_set = set(candidates.pieces)
    return Selection(
        pieces=[m.piece for m in kept],
        piece_type=NORMAL,
        domain_use={m.piece: result.final_use.get(m.piece, 0) for m in kept},
        details={
            "merges_learned": len(result.merges),
            "merges_kept": len(kept),
            "guided_pieces": sum(1 for m in kept if m.piece in guide),
            "candidate_pieces_added": sum(1 for m in kept if m.piece in candidate_set),
            "bpe_seconds": round(time.perf_counter() - started, 2),
        },
    )


# --- verification ----------------------------------------------------------------------------------


def reachability(model: sp_pb2.ModelProto, first_new: int, count: int, domain_ids: list[list[int]]) -> dict:
    """Which added pieces SentencePiece produces: on the domain data, or at least from their own text."""
    produced = Counter(i for ids in domain_ids for i in ids if first_new <= i < first_new + count)
    alone = without_dummy_prefix(model)
    unreachable = []
    for offset in range(count):
        token_id = first_new + offset
        if produced[token_id]:
            continue
        piece = model.pieces[token_id].piece
        if alone.encode(surface(piece)) != [token_id]:
            unreachable.append(piece)
    return {
        "added": count,
        "seen_in_domain_data": sum(1 for k in range(count) if produced[first_new + k]),
        "reachable": count - len(unreachable),
        "unreachable": unreachable,
    }


def prune_unused(model: sp_pb2.ModelProto, base_size: int, keep_pieces: list[str], domain_ids: list[list[int]],
                 piece_type: int) -> list[str]:
    """Drop added pieces SentencePiece never produces on the domain data and no kept piece is built from.

    A NORMAL piece that is never produced may still be an intermediate merge of a
    produced one (SentencePiece merges pairwise), so only pieces that are no
    substring-building step of a produced piece are dropped: that costs no compression.
    """
    produced = {model.pieces[i].piece for ids in domain_ids for i in ids if i >= base_size}
    if piece_type != NORMAL:
        return [p for p in keep_pieces if p in produced]
    needed = set(produced)
    for piece in produced:
        needed.update(piece[i:j] for i in range(len(piece)) for j in range(i + 2, len(piece) + 1))
    return [p for p in keep_pieces if p in needed]


# --- the stage -------------------------------------------------------------------------------------


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


def _validate(config: TokenizerConfig) -> None:
    checks = [
        (config.domain_vocab_size >= 100, "domain_vocab_size must be at least 100"),
        (0 < config.freq_threshold <= 1, "freq_threshold must be in (0, 1]"),
        (config.occur_limit >= 0, "occur_limit must be >= 0"),
        (config.max_added_tokens is None or config.max_added_tokens > 0, "max_added_tokens must be positive"),
        (config.max_tensor_parallel >= 1, "max_tensor_parallel must be >= 1"),
        (config.min_reserved >= 0, "min_reserved must be >= 0"),
        (config.general_penalty >= 0 and config.guide_bonus >= 0, "general_penalty and guide_bonus must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise TokenizerError(f"bad parameter: {message}.")


def adapt_tokenizer(config: TokenizerConfig) -> Path:
    """Run the whole adaptation and write the tokenizer folder; returns its path."""
    from dapt import tokenizer_report

    _validate(config)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now

    base_path = resolve_sp_model(config.base_tokenizer)
    base = load_proto(base_path)
    base_vocab = {p.piece for p in base.pieces}
    domain = load_corpus(config.domain_data, "domain", config.text_keys)
    general = load_corpus(config.general_data, "general", config.text_keys)
    domain_texts = [mask_blobs(d.text) for d in domain.documents]
    general_texts = [d.text for d in general.documents]
    lap("read corpora")

    settings = dict(LLAMA2_TRAINER_SETTINGS, character_coverage=base.trainer_spec.character_coverage or 0.99995)
    domain_model = train_sentencepiece(domain_texts, config.domain_vocab_size, settings)
    lap("train domain tokenizer")
    candidates = find_candidates(domain_model, base_vocab, general, config.occur_limit)
    lap("candidates")
    if not candidates.pieces:
        raise TokenizerError(
            f"no candidate domain tokens: every piece of the {config.domain_vocab_size}-piece domain tokenizer is "
            f"in the base vocabulary or frequent in {config.general_data}; raise --domain-vocab-size or --occur-limit."
        )
    before = {"domain_train": encode_texts(base, domain_texts), "general_train": encode_texts(base, general_texts)}
    lap("base segmentation")
    if config.method == "chipnemo":
        selection = select_chipnemo(base, candidates, domain_texts, config.freq_threshold, config.max_added_tokens)
    else:
        selection = select_guided_bpe(base, candidates, before["domain_train"], before["general_train"], config)
    lap("select tokens")

    model = extend_model(base, selection.pieces, selection.piece_type)
    domain_ids = encode_texts(model, domain_texts)
    pieces = prune_unused(model, len(base.pieces), selection.pieces, domain_ids, selection.piece_type)
    if len(pieces) != len(selection.pieces):
        model = extend_model(base, pieces, selection.piece_type)
        domain_ids = encode_texts(model, domain_texts)
    reach = reachability(model, len(base.pieces), len(pieces), domain_ids)
    after = {"domain_train": domain_ids}
    added_count = len(pieces)
    reserved = pad_vocabulary(model, config.max_tensor_parallel, config.min_reserved)
    lap("merge and pad")

    inputs = {
        "base_tokenizer": {"path": str(base_path), "sha256": file_sha256(base_path)},
        "domain_data": domain.summary(),
        "general_data": general.summary(),
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
        lap("write files")
        report = tokenizer_report.build_report(
            base=base, adapted=model, folder=tmp,
            train={"domain_train": (domain, domain_texts), "general_train": (general, general_texts)},
            before=before, after=after,
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
        lap("report")
        report["seconds"] = timings
        write_json(tmp / "report.json", report)
        tokenizer_report.plot_cumulative_use(selection.domain_use, config.freq_threshold, tmp / "cumulative_use.png")
        tokenizer_report.plot_compression(report, tmp / "compression_by_file_type.png")
    print(tokenizer_report.summary_line(report, config.output))
    return Path(config.output)


def write_hf_tokenizer(folder: Path) -> None:
    """Write transformers' fast-tokenizer files for ``folder/tokenizer.model``.

    The fast tokenizer is converted from the SentencePiece model with Llama's
    converter (non-legacy Metaspace, prefix on the first word only), which gives
    the same ids as SentencePiece for the pieces this module adds.
    """
    from transformers import LlamaTokenizerFast

    fast = LlamaTokenizerFast(
        vocab_file=str(folder / TOKENIZER_FILE), legacy=False, add_prefix_space=True, from_slow=True,
    )
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        fast.save_pretrained(scratch)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(Path(scratch) / name, folder / name)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # Without add_prefix_space the tokenizer loads tokenizer.json as written (no re-conversion,
    # no sentencepiece needed); the Metaspace pre-tokenizer already prepends '▁' to the first word.
    config.pop("add_prefix_space", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

