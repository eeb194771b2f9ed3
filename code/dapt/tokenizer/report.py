"""Recipe step 7: what the adapted tokenizer changes, measured: token counts before and after, per corpus,
source and file type, round trips, and the fast tokenizer's agreement with SentencePiece (plots: :mod:`.plots`)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import sentencepiece as spm

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.corpus import Corpus, CorpusError, load_corpus
from dapt.tokenizer.sentencepiece_model import processor


def _ratio(after: int, before: int) -> float:
    return round(100.0 * (after - before) / before, 3) if before else 0.0


class GroupSums:
    """Running token, byte and word counts of a group of documents (a corpus, a source, a file type)."""

    def __init__(self) -> None:
        self.documents = self.bytes = self.words = 0
        self.tokens_before = self.tokens_after = self.longer = self.shorter = 0

    def add(self, num_bytes: int, words: int, before: int, after: int) -> None:
        """Count one document of ``num_bytes`` UTF-8 bytes with ``before``/``after`` tokens."""
        self.documents += 1
        self.bytes += num_bytes
        self.words += words
        self.tokens_before += before
        self.tokens_after += after
        self.longer += after > before
        self.shorter += after < before

    def stats(self) -> dict:
        before, after, num_bytes, words = self.tokens_before, self.tokens_after, self.bytes, self.words
        return {
            "documents": self.documents,
            "bytes": num_bytes,
            "tokens_before": before,
            "tokens_after": after,
            "change_percent": _ratio(after, before),
            "bytes_per_token_before": round(num_bytes / max(before, 1), 4),
            "bytes_per_token_after": round(num_bytes / max(after, 1), 4),
            "tokens_per_word_before": round(before / max(words, 1), 4),
            "tokens_per_word_after": round(after / max(words, 1), 4),
            "documents_longer": self.longer,
            "documents_shorter": self.shorter,
        }


class CorpusSums:
    """Streamed :func:`corpus_stats`: token counts in total and per source and file type."""

    def __init__(self) -> None:
        self.total = GroupSums()
        self.groups: dict[str, dict[str, GroupSums]] = {"by_source": defaultdict(GroupSums),
                                                        "by_file_type": defaultdict(GroupSums)}

    def add(self, source: str, file_type: str, num_bytes: int, words: int, before: int, after: int) -> None:
        """Count one document of ``source`` and ``file_type``: its measured text's UTF-8 bytes and
        whitespace-separated words, and its tokens before and after."""
        counts = (num_bytes, words, before, after)
        self.total.add(*counts)
        self.groups["by_source"][source].add(*counts)
        self.groups["by_file_type"][file_type].add(*counts)

    def stats(self) -> dict:
        stats = self.total.stats()
        for key, groups in self.groups.items():
            stats[key] = {name: groups[name].stats() for name in sorted(groups)}
        return stats


def corpus_stats(corpus: Corpus, texts: list[str], before: list[list[int]], after: list[list[int]],
                 adapted_sp: spm.SentencePieceProcessor | None = None) -> dict:
    """Token counts before and after, in total and per source and file type.

    With ``adapted_sp`` the documents' round trips (decode(encode(x)) == x) are checked too.
    """
    sums = CorpusSums()
    for doc, text, ids_before, ids_after in zip(corpus.documents, texts, before, after):
        sums.add(doc.source, doc.file_type, len(text.encode("utf-8")), len(text.split()), len(ids_before),
                 len(ids_after))
    stats = sums.stats()
    if adapted_sp is not None:
        decoded = adapted_sp.decode(after)
        stats["round_trip_failures"] = [f"{corpus.documents[i].path}:{corpus.documents[i].line}"
                                        for i, (t, d) in enumerate(zip(texts, decoded)) if t != d]
    return stats


def hf_agreement(folder: Path, corpus: Corpus, sp_ids: list[list[int]]) -> dict:
    """How many documents the fast tokenizer in ``folder`` encodes to other ids than SentencePiece.

    The fast tokenizer is ``tokenizer.json`` run by the tokenizers library, the engine behind
    ``transformers.AutoTokenizer``'s fast tokenizer (the tests check both give the same ids).
    """
    import tokenizers

    fast = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = [d.text for d in corpus.documents]
    hf_ids = [encoding.ids for encoding in fast.encode_batch(texts, add_special_tokens=False)]
    differing = [corpus.documents[i].path + f":{corpus.documents[i].line}"
                 for i, (a, b) in enumerate(zip(hf_ids, sp_ids)) if list(a) != list(b)]
    return {"documents": len(texts), "differing": len(differing), "examples": differing[:5],
            "engine": f"tokenizers {tokenizers.__version__}"}


def _optional_corpus(path: Path | None, name: str, text_keys: tuple[str, ...]) -> Corpus | None:
    if path is None:
        return None
    try:
        return load_corpus(path, name, text_keys)
    except CorpusError as error:
        print(f"note: no {name} report ({error})")
        return None


def build_report(base: sp_pb2.ModelProto, adapted: sp_pb2.ModelProto, folder: Path, train: dict[str, dict],
                 heldout: dict[str, Path | None], text_keys: tuple[str, ...]) -> dict:
    """Compression before and after on every corpus; round trips and HF agreement on held-out text.

    ``train`` holds the training corpora's statistics, already streamed by the caller
    (:class:`CorpusSums`); the small held-out corpora are read and encoded here.
    """
    base_sp, adapted_sp = processor(base), processor(adapted)
    report: dict = {"corpora": dict(train), "hf_agreement": {}}
    for name, path in heldout.items():
        corpus = _optional_corpus(path, name, text_keys)
        if corpus is None:
            continue
        texts = [d.text for d in corpus.documents]
        ids_after = adapted_sp.encode(texts, num_threads=2)
        report["corpora"][name] = corpus_stats(corpus, texts, base_sp.encode(texts, num_threads=2), ids_after,
                                               adapted_sp)
        report["hf_agreement"][name] = hf_agreement(folder, corpus, ids_after)
    return report


def summary_line(report: dict, output: Path) -> str:
    """One readable line per corpus for the console."""
    lines = [f"{report['method']}: {report['added_tokens']} tokens added + {report['reserved_tokens']} reserved "
             f"= {report['vocab_size']} (multiple of {report['vocab_multiple']}) -> {output}"]
    for name, stats in report["corpora"].items():
        hf = report["hf_agreement"].get(name)
        extra = f", HF ids differ on {hf['differing']}/{hf['documents']} docs" if hf else ""
        lines.append(f"  {name:16s} {stats['change_percent']:+7.2f}% tokens, "
                     f"{stats['documents_longer']} docs longer{extra}")
    return "\n".join(lines)


def comparison_table(reports: dict[str, dict]) -> str:
    """A markdown table comparing tokenizer reports (one column per method or run) on held-out text."""
    rows = [
        ("added tokens (before padding)", lambda r: f"{r['added_tokens']:,}"),
        ("vocabulary after padding", lambda r: f"{r['vocab_size']:,}"),
        ("domain held-out tokens", lambda r: _held(r, "domain_heldout", "change_percent", "{:+.2f}%")),
        ("general held-out tokens", lambda r: _held(r, "general_heldout", "change_percent", "{:+.2f}%")),
        ("general held-out docs longer", lambda r: _held(r, "general_heldout", "documents_longer", "{}")),
        ("domain held-out docs longer", lambda r: _held(r, "domain_heldout", "documents_longer", "{}")),
        ("HF ids differ (domain held-out docs)", lambda r: _hf(r, "domain_heldout")),
        ("HF ids differ (general held-out docs)", lambda r: _hf(r, "general_heldout")),
        ("added tokens reachable", lambda r: f"{r['reachability']['reachable']:,}"),
        ("added tokens seen on domain data", lambda r: f"{r['reachability']['seen_in_domain_data']:,}"),
    ]
    header = "| | " + " | ".join(reports) + " |\n|---|" + "---:|" * len(reports) + "\n"
    return header + "\n".join(
        f"| {label} | " + " | ".join(cell(r) for r in reports.values()) + " |" for label, cell in rows
    )


def _held(report: dict, corpus: str, key: str, fmt: str) -> str:
    stats = report["corpora"].get(corpus)
    return fmt.format(stats[key]) if stats else "n/a"


def _hf(report: dict, corpus: str) -> str:
    agreement = report["hf_agreement"].get(corpus)
    return f"{agreement['differing']} / {agreement['documents']}" if agreement else "n/a"
