"""What the adapted tokenizer changes: token counts before and after, per corpus, source and file type,
round trips, fast-tokenizer agreement, and the plots that show it."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import sentencepiece as spm

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.corpus import Corpus, CorpusError, load_corpus


def _processor(model: sp_pb2.ModelProto) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


def _ratio(after: int, before: int) -> float:
    return round(100.0 * (after - before) / before, 3) if before else 0.0


def _group_stats(texts: list[str], before: list[list[int]], after: list[list[int]]) -> dict:
    tokens_before = sum(map(len, before))
    tokens_after = sum(map(len, after))
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(t.split()) for t in texts)
    return {
        "documents": len(texts),
        "bytes": num_bytes,
        "tokens_before": tokens_before,
        "tokens_after": tokens_after,
        "change_percent": _ratio(tokens_after, tokens_before),
        "bytes_per_token_before": round(num_bytes / max(tokens_before, 1), 4),
        "bytes_per_token_after": round(num_bytes / max(tokens_after, 1), 4),
        "tokens_per_word_before": round(tokens_before / max(words, 1), 4),
        "tokens_per_word_after": round(tokens_after / max(words, 1), 4),
        "documents_longer": sum(len(a) > len(b) for a, b in zip(after, before)),
        "documents_shorter": sum(len(a) < len(b) for a, b in zip(after, before)),
    }


def corpus_stats(corpus: Corpus, texts: list[str], before: list[list[int]], after: list[list[int]],
                 adapted_sp: spm.SentencePieceProcessor | None = None) -> dict:
    """Token counts before and after, in total and per source and file type.

    With ``adapted_sp`` the documents' round trips (decode(encode(x)) == x) are checked too.
    """
    stats = _group_stats(texts, before, after)
    for key, attribute in (("by_source", "source"), ("by_file_type", "file_type")):
        groups: dict[str, list[int]] = defaultdict(list)
        for index, doc in enumerate(corpus.documents):
            groups[getattr(doc, attribute)].append(index)
        stats[key] = {
            name: _group_stats([texts[i] for i in idx], [before[i] for i in idx], [after[i] for i in idx])
            for name, idx in sorted(groups.items())
        }
    if adapted_sp is not None:
        decoded = adapted_sp.decode(after)
        stats["round_trip_failures"] = [f"{corpus.documents[i].path}:{corpus.documents[i].line}"
                                        for i, (t, d) in enumerate(zip(texts, decoded)) if t != d]
    return stats


def hf_agreement(folder: Path, corpus: Corpus, sp_ids: list[list[int]]) -> dict:
    """How many documents the fast tokenizer in ``folder`` encodes to other ids than SentencePiece."""
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(folder))
    texts = [d.text for d in corpus.documents]
    hf_ids = fast(texts, add_special_tokens=False)["input_ids"]
    differing = [corpus.documents[i].path + f":{corpus.documents[i].line}"
                 for i, (a, b) in enumerate(zip(hf_ids, sp_ids)) if list(a) != list(b)]
    return {"documents": len(texts), "differing": len(differing), "examples": differing[:5],
            "tokenizer_class": type(fast).__name__}


def _optional_corpus(path: Path | None, name: str, text_keys: tuple[str, ...]) -> Corpus | None:
    if path is None:
        return None
    try:
        return load_corpus(path, name, text_keys)
    except CorpusError as error:
        print(f"note: no {name} report ({error})")
        return None


def build_report(base: sp_pb2.ModelProto, adapted: sp_pb2.ModelProto, folder: Path,
                 train: dict[str, tuple[Corpus, list[str]]], before: dict[str, list[list[int]]],
                 after: dict[str, list[list[int]]], heldout: dict[str, Path | None],
                 text_keys: tuple[str, ...]) -> dict:
    """Compression before and after on every corpus; round trips and HF agreement on held-out text.

    ``before``/``after`` hold segmentations already computed by the caller; missing ones are encoded here.
    """
    from dapt.tokenizer import encode_texts

    base_sp, adapted_sp = _processor(base), _processor(adapted)
    report: dict = {"corpora": {}, "hf_agreement": {}}
    for name, (corpus, texts) in train.items():
        ids_before = before.get(name) or encode_texts(base, texts)
        ids_after = after.get(name) or encode_texts(adapted, texts)
        report["corpora"][name] = corpus_stats(corpus, texts, ids_before, ids_after)
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


def plot_cumulative_use(domain_use: dict[str, int], threshold: float, path: Path) -> None:
    """Cumulative share of new-token uses against the number of tokens kept, with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.sort(np.asarray(list(domain_use.values()) or [0], dtype=float))[::-1]
    share = np.cumsum(counts) / max(counts.sum(), 1.0)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(share) + 1), share)
    ax.axhline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("added tokens, most used first")
    ax.set_ylabel("cumulative share of uses on domain data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compression(report: dict, path: Path) -> None:
    """Bytes per token before and after, per file type of the domain training data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    per_type = report["corpora"]["domain_train"]["by_file_type"]
    names = sorted(per_type, key=lambda n: -per_type[n]["bytes"])[:12]
    before = [per_type[n]["bytes_per_token_before"] for n in names]
    after = [per_type[n]["bytes_per_token_after"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, before, 0.4, label="base")
    ax.bar(x + 0.2, after, 0.4, label="adapted")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("bytes per token (higher is better)")
    ax.set_title(f"domain compression by file type ({report['method']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
