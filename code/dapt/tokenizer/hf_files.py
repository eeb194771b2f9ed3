"""Recipe step 6: the Hugging Face fast-tokenizer files, written from the SentencePiece model alone.

``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` hold what transformers' Llama
converter (4.41 and later) writes for the adapted model, without importing transformers (5 s of CPU) and in
a form tokenizers 0.19 (the NeMo 24.07 container) reads too.
"""

from __future__ import annotations

import json
from pathlib import Path

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.tokenizer.sentencepiece_model import CONTROL, TOKENIZER_FILE, UNKNOWN, USER_DEFINED, load_proto

# The fast tokenizer of a Llama-style SentencePiece BPE model, as tokenizers >= 0.19 and transformers >= 4.41
# describe it: SentencePiece's dummy prefix is one "▁" before the first word (none after a special token),
# spaces become "▁", unknown characters fall back to <0xNN> bytes, BOS is added in front.
_HF_PRE_TOKENIZER = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
_HF_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
    {"type": "ByteFallback"},
    {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0},
]}
_HF_TOKEN_FLAGS = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
HF_MAX_LENGTH = int(1e30)  # transformers' "no limit" for model_max_length


def bpe_merges(model: sp_pb2.ModelProto) -> list[str]:
    """The fast tokenizer's BPE merges ("left right") of a SentencePiece BPE model.

    Every way to split a piece into two pieces of the vocabulary is a merge; merges rank by the score of
    the piece they build (SentencePiece applies the highest-scoring one first), then longer left part, then
    longer right part, then the built piece's id: the order of transformers' Llama converter (4.41 and later).
    """
    ids = {p.piece: i for i, p in enumerate(model.pieces)}
    merges = []
    for piece_id, piece in enumerate(model.pieces):
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in ids and right in ids:
                merges.append((-piece.score, -len(left), -len(right), piece_id, left, right))
    merges.sort(key=lambda merge: merge[:4])
    return [f"{left} {right}" for *_, left, right in merges]


def hf_tokenizer_files(model: sp_pb2.ModelProto) -> dict[str, dict]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` of a Llama-style model.

    Written from the SentencePiece model alone (no transformers, no conversion): the files read the same in
    tokenizers 0.19 / transformers 4.40 (the NeMo 24.07 container) and in newer releases. Merges are
    ``"left right"`` strings, the form every tokenizers release reads (SentencePiece pieces hold no space).
    """
    pieces = model.pieces
    special = {UNKNOWN: True, CONTROL: True, USER_DEFINED: False}
    added = [{"id": i, "content": p.piece, **_HF_TOKEN_FLAGS, "special": special[p.type]}
             for i, p in enumerate(pieces) if p.type in special]
    unk, bos, eos = (pieces[i].piece for i in (model.trainer_spec.unk_id, model.trainer_spec.bos_id,
                                                model.trainer_spec.eos_id))
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": _HF_PRE_TOKENIZER,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [model.trainer_spec.bos_id], "tokens": [bos]}},
        },
        "decoder": _HF_DECODER,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": {p.piece: i for i, p in enumerate(pieces)}, "merges": bpe_merges(model),
        },
    }
    config = {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in sorted(t) if k != "id"} for t in added},
        "bos_token": bos, "clean_up_tokenization_spaces": False, "eos_token": eos, "legacy": False,
        "model_max_length": HF_MAX_LENGTH, "pad_token": None, "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer", "unk_token": unk,
        "use_default_system_prompt": False,
    }
    flags = {k: _HF_TOKEN_FLAGS[k] for k in sorted(_HF_TOKEN_FLAGS)}
    special_map = {name: {"content": text, **flags} for name, text in
                   (("bos_token", bos), ("eos_token", eos), ("unk_token", unk))}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config, "special_tokens_map.json": special_map}


def write_hf_tokenizer(folder: Path) -> None:
    """Write the HF fast-tokenizer files for ``folder/tokenizer.model`` (see :func:`hf_tokenizer_files`)."""
    for name, content in hf_tokenizer_files(load_proto(folder / TOKENIZER_FILE)).items():
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


