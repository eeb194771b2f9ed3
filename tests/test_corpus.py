"""Corpus reading: counts on real data and clear errors for every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from dapt.cli import main as cli
from dapt.corpus import CorpusError, load_corpus, looks_like_blob, mask_blobs


def test_reads_real_corpus_recursively(shared_data: Path) -> None:
    corpus = load_corpus(shared_data, "all")
    summary = corpus.summary()
    assert summary["documents"] == 794 + 399 + 88 + 46
    assert summary["bytes"] == 6_617_226 + 3_396_772 + 633_152 + 363_298
    assert "verilog" in summary["file_types"]


def test_custom_text_key(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"content": "module x; endmodule"}\n')
    assert load_corpus(tmp_path, "c", ("text", "content")).documents[0].text == "module x; endmodule"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "ok"}\n{"text": "broken"\n', "b.jsonl:2: malformed JSON"),
        (b'{"text": "ok"}\n{"body": "no text"}\n', "b.jsonl:2: none of the text keys ['text']"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "b.jsonl:2: bytes that are not UTF-8"),
        (b'{"text": 3}\n', "b.jsonl:1: field 'text' is int"),
        (b'["text"]\n', "b.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "b.jsonl").write_bytes(content)
    with pytest.raises(CorpusError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_corpus(tmp_path, "bad")


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "nope", "x")
    with pytest.raises(CorpusError, match="holds no \\*.jsonl files"):
        load_corpus(tmp_path, "x")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(CorpusError, match="no non-empty documents"):
        load_corpus(tmp_path, "x")


def test_cli_reports_bad_input_with_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "b.jsonl").write_text('{"text": "x"\n')
    code = cli(["tokenizer", "--domain-data", str(tmp_path), "--general-data", str(tmp_path),
                "--base-tokenizer", str(tmp_path / "missing.model"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "no SentencePiece model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_blobs_are_masked_but_code_is_kept() -> None:
    text = (
        "assign data_o = 32'hDEADBEEF_CAFEF00D;\n"
        "// VXNlIGFsbW9zdCBhbnl0aGluZyBidXQgYmFzZTY0IGhlcmU=\n"
        "localparam INIT = 64'b0101010101010101010101010101;\n"
        "commit 87c89acc18994c8cf9a2311e871818e87d304568\n"
        "always_ff @(posedge clk_i) begin\n"
    )
    masked = mask_blobs(text)
    for blob in ("DEADBEEF", "VXNlIGFsbW9zdCBh", "0101010101010101", "87c89acc1899"):
        assert blob not in masked
    for code in ("assign data_o", "always_ff @(posedge clk_i) begin", "localparam INIT"):
        assert code in masked
    assert looks_like_blob("▁VXNlIGFsbW") and looks_like_blob("9a2311e871")
    assert not looks_like_blob("▁always_ff") and not looks_like_blob("AXI4Lite") and not looks_like_blob("▁rv32i")
