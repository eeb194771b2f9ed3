"""Long texts encoded in safe pieces give exactly SentencePiece's ids of the whole text, on real models and data."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sentencepiece as spm

from dapt.compat import sentencepiece_model_pb2 as sp_pb2
from dapt.corpus import iter_documents
from dapt.piecewise import BYTE, UNUSED, USER_DEFINED, CutRule, PieceEncoder, UncuttableTextError

STRESS = (
    "   leading spaces, then  two, then   three\tand a tab\n\n"
    "CJK \u65e5\u672c\u8a9e\u306e\u6587\u7ae0 and emoji \U0001f600\U0001f680 and \u00e9\u00e8\u00ea accents\n"
    "digits 1234567890 0x1F_2A 32'hDEAD_BEEF wire [31:0] data_q;\r\n"
    "literal \u2581 lower-one-eighth blocks \u2581\u2581 beside spaces  \u2581 \n"
    "rare \u0b85\u0b86\u0b87 \u16a0\u16a2 \U00010348 unknown scripts\u3000ideographic space"
    "trailing spaces   "
)


def _variant(source: Path, tmp_path: Path, name: str, change) -> Path:
    model = sp_pb2.ModelProto()
    model.ParseFromString(source.read_bytes())
    change(model)
    path = tmp_path / f"{name}.model"
    path.write_bytes(model.SerializeToString())
    return path


def _add_user_defined(model: sp_pb2.ModelProto) -> None:
    # user-defined pieces are matched wherever they occur, across spaces and line breaks too
    for piece in ("e▁m", "endmodule\n", ";▁//", "▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁", "日本語の"):
        model.pieces.add(piece=piece, score=0.0, type=USER_DEFINED)


def _no_byte_fallback(model: sp_pb2.ModelProto) -> None:
    model.trainer_spec.byte_fallback = False  # unknown characters become <unk>, runs of them one <unk>
    for piece in model.pieces:
        if piece.type == BYTE:
            piece.type = UNUSED  # SentencePiece refuses byte pieces without byte fallback


def _lossless(model: sp_pb2.ModelProto) -> None:
    model.normalizer_spec.remove_extra_whitespaces = False


def _suffix(model: sp_pb2.ModelProto) -> None:
    model.trainer_spec.treat_whitespace_as_suffix = True  # the dummy '▁' goes at the end


@pytest.fixture(scope="module")
def models(tmp_path_factory, llama2_tokenizer: Path, stories260k: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("models")
    tok512 = stories260k / "tok512.model"
    return {
        "llama2": llama2_tokenizer,
        "llama2+user-defined": _variant(llama2_tokenizer, tmp, "user", _add_user_defined),
        "llama2-no-byte-fallback": _variant(llama2_tokenizer, tmp, "nofallback", _no_byte_fallback),
        "tok512 (remove_extra_whitespaces)": tok512,
        "tok512-lossless": _variant(tok512, tmp, "lossless", _lossless),
        "tok512-no-byte-fallback": _variant(tok512, tmp, "tok512nofallback", _no_byte_fallback),
        "tok512-suffix": _variant(tok512, tmp, "suffix", _suffix),
    }


@pytest.fixture(scope="module")
def real_text(shared_data: Path) -> str:
    """All held-out documents (code and prose, 1 MB) as one text, with the stress lines between them."""
    texts = [doc.text for doc in iter_documents(shared_data / "heldout")]
    return STRESS.join(texts)


MODEL_NAMES = ["llama2", "llama2+user-defined", "llama2-no-byte-fallback", "tok512 (remove_extra_whitespaces)",
               "tok512-lossless", "tok512-no-byte-fallback", "tok512-suffix"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pieces_give_the_ids_of_the_whole_text(models, real_text: str, name: str) -> None:
    whole = spm.SentencePieceProcessor(model_file=str(models[name]))
    expected = whole.encode(real_text)
    for piece_chars in (4096, 301):
        encoder = PieceEncoder(models[name], piece_chars=piece_chars, max_piece_chars=64 * piece_chars)
        cuts = encoder.rule.cuts(real_text, piece_chars, 64 * piece_chars)
        assert len(cuts) >= len(real_text) // piece_chars - 1  # really cut, at about the asked size
        assert encoder.encode(real_text) == expected, (name, piece_chars)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_safe_cut_of_the_stress_text_is_exact(models, name: str) -> None:
    """Each single cut the rule allows, anywhere in a text of spaces, unknown scripts and literal '▁'."""
    encoder = PieceEncoder(models[name])
    text = STRESS * 2
    expected = encoder.whole.encode(text)
    safe = [p for p in range(1, len(text)) if encoder.rule.is_safe(text, p)]
    assert len(safe) > 20
    for position in safe:
        left, right = text[:position], text[position:]
        ids = encoder.processor_for(True, False).encode(left) + encoder.processor_for(False, True).encode(right)
        assert ids == expected, (name, position, text[position - 5:position + 5])


def test_llama2_cuts_before_spaces_and_beside_newlines_and_digits(llama2_tokenizer: Path) -> None:
    rule = PieceEncoder(llama2_tokenizer).rule
    text = "assign data_q = 32'd15;\nend"
    assert rule.is_safe(text, text.index(" data_q"))  # before a space that follows a letter
    assert rule.is_safe(text, text.index("\n")) and rule.is_safe(text, text.index("\n") + 1)
    assert rule.is_safe(text, text.index("15") + 1)  # between two digits
    assert not rule.is_safe(text, text.index("ssign"))  # inside a word
    assert not rule.is_safe(text, text.index(" data_q") + 1)  # after the space: '▁d' is a piece


def test_a_run_without_safe_cuts_is_refused_not_encoded_whole(llama2_tokenizer: Path) -> None:
    encoder = PieceEncoder(llama2_tokenizer, piece_chars=100, max_piece_chars=400)
    dna = "ACGT" * 1000
    assert not any(encoder.rule.is_safe(dna, p) for p in range(1, len(dna)))
    with pytest.raises(UncuttableTextError, match="no place to cut in the 400 characters from character 0"):
        encoder.encode(dna)
    assert encoder.encode(dna[:399]) == encoder.whole.encode(dna[:399])  # short enough: one piece


def test_unigram_models_are_encoded_whole(tmp_path: Path, real_text: str) -> None:
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(real_text.splitlines()[:3000]), model_writer=buffer,
                                   vocab_size=300, model_type="unigram", minloglevel=2)
    path = tmp_path / "unigram.model"
    path.write_bytes(buffer.getvalue())
    model = sp_pb2.ModelProto()
    model.ParseFromString(buffer.getvalue())
    rule = CutRule.of(model)
    assert (rule.cuttable, rule.why_not) == (False, "not a BPE model")
    encoder = PieceEncoder(path, piece_chars=100)
    assert list(encoder.pieces(real_text[:5000])) == [(real_text[:5000], True, True)]
    assert encoder.encode(real_text[:5000]) == encoder.whole.encode(real_text[:5000])
