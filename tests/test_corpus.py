"""Corpus reading: counts on real data and clear errors for every kind of bad input."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import sys
import tracemalloc
from pathlib import Path

import pytest

from dapt.cli import main as cli
from dapt.corpus import CorpusError, find_jsonl_files, iter_documents, load_corpus, looks_like_blob, mask_blobs


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


# --- inputs users really have (issue 12, items 6 and 10-13) ---------------------------------------------------

RECORDS = [{"text": f"module m{i}; // caf\u00e9 {i}\nendmodule", "file_type": "verilog"} for i in range(40)]


def _jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _texts(path: Path) -> list[str]:
    return [doc.text for doc in iter_documents(path)]


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_files_are_read_beside_plain_ones(tmp_path: Path, suffix: str) -> None:
    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}.get(suffix)
    if compress is None:
        zstandard = pytest.importorskip("zstandard", reason="zstandard is not installed (optional, for .zst)")
        # two frames, as parallel compressors write them: both must be read
        half = len(RECORDS) // 2
        data = (zstandard.ZstdCompressor().compress(_jsonl_bytes(RECORDS[:half]))
                + zstandard.ZstdCompressor().compress(_jsonl_bytes(RECORDS[half:])))
    else:
        data = compress(_jsonl_bytes(RECORDS))
    (tmp_path / "a_plain.jsonl").write_bytes(_jsonl_bytes(RECORDS[:3]))
    (tmp_path / f"b_packed.jsonl{suffix}").write_bytes(data)
    assert [p.name for p in find_jsonl_files(tmp_path)] == ["a_plain.jsonl", f"b_packed.jsonl{suffix}"]
    docs = list(iter_documents(tmp_path))
    assert [d.text for d in docs] == [r["text"] for r in RECORDS[:3] + RECORDS]
    assert (docs[-1].path, docs[-1].line) == (str(tmp_path / f"b_packed.jsonl{suffix}"), len(RECORDS))


def test_zstd_without_its_package_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails as if it were not installed
    with pytest.raises(CorpusError, match=r"c.jsonl.zst is zstd-compressed .*pip install zstandard=="):
        list(iter_documents(tmp_path))


def test_compressed_file_named_jsonl_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_bytes(gzip.compress(_jsonl_bytes(RECORDS)))
    with pytest.raises(CorpusError, match=r"d.jsonl is gzip-compressed but its name does not say so; "
                                          r"rename it to d.jsonl.gz"):
        list(iter_documents(tmp_path))


def test_truncated_gzip_is_a_clean_error(tmp_path: Path) -> None:
    data = gzip.compress(_jsonl_bytes(RECORDS * 50))
    (tmp_path / "e.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match=r"e.jsonl.gz:\d+: cannot be read or decompressed .*truncated"):
        list(iter_documents(tmp_path))


def test_compressed_input_is_streamed_not_decompressed_whole(tmp_path: Path) -> None:
    record = json.dumps({"text": "assign q = d; // " + "x" * 200}) + "\n"
    plain = (record * 100_000).encode()  # 22 MB of JSONL, about 100 kB compressed
    (tmp_path / "f.jsonl.gz").write_bytes(gzip.compress(plain))
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_documents(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 100_000
    assert peak < 4_000_000, f"reading 22 MB of gzip-compressed JSONL peaked at {peak / 1e6:.1f} MB"


def test_symlinked_subfolders_are_followed_once_and_loops_end(tmp_path: Path) -> None:
    outside = tmp_path / "shards"
    outside.mkdir()
    (outside / "s1.jsonl").write_bytes(_jsonl_bytes(RECORDS[:2]))
    root = tmp_path / "corpus"
    (root / "real").mkdir(parents=True)
    (root / "real" / "r.jsonl").write_bytes(_jsonl_bytes(RECORDS[2:3]))
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "real" / "loop").symlink_to(root, target_is_directory=True)  # a cycle back to the top
    (root / "again").symlink_to(root / "real", target_is_directory=True)  # the same folder twice
    files = find_jsonl_files(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["again/r.jsonl", "linked/s1.jsonl"]
    assert sorted(_texts(root)) == sorted(r["text"] for r in RECORDS[:3])


def test_byte_order_mark_at_file_start_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "g.jsonl").write_bytes(b"\xef\xbb\xbf" + _jsonl_bytes(RECORDS[:2]))
    assert _texts(tmp_path) == [r["text"] for r in RECORDS[:2]]


def test_json_error_names_the_right_line_and_column(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"line {i}"}) for i in range(12)]
    lines.append('{"text": "thirteen", "n": 123456')  # cut off: the error is at the line's end, column 33
    lines.append(json.dumps({"text": "fourteen"}))
    (tmp_path / "h.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=r"h.jsonl:13: malformed JSON \(Expecting ',' delimiter at column 33\)"):
        list(iter_documents(tmp_path))
    (tmp_path / "h.jsonl").write_text("\n".join([*lines[:12], '{"text": "thirteen", "n";13}']) + "\r\n")
    with pytest.raises(CorpusError, match=r"h.jsonl:13: malformed JSON \(Expecting ':' delimiter at column 25\)"):
        list(iter_documents(tmp_path))


@pytest.mark.parametrize("record", [
    '{"text": "ok \\ud800 then"}',
    '{"text": "fine", "source": "x\\udc00"}',
])
def test_lone_surrogate_is_refused_at_read_time(tmp_path: Path, record: str) -> None:
    (tmp_path / "i.jsonl").write_text('{"text": "pair \\ud83d\\ude00 is fine"}\n' + record + "\n")
    with pytest.raises(CorpusError, match=r"i.jsonl:2: field '(text|source)' holds a lone surrogate "
                                          r"\(\\u(d800|dc00) at character \d+\)"):
        list(iter_documents(tmp_path))
    (tmp_path / "i.jsonl").write_text('{"text": "pair \\ud83d\\ude00 is fine"}\n')
    assert _texts(tmp_path) == ["pair \U0001f600 is fine"]


@pytest.mark.parametrize("stage", ["data", "tokenizer"])
def test_lone_surrogate_exits_2_in_each_stage(tmp_path: Path, capsys, stage: str, llama2_tokenizer: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "j.jsonl").write_text('{"text": "module a; endmodule"}\n{"text": "bad \\udfff"}\n')
    if stage == "data":
        args = ["data", "--tokenizer", str(llama2_tokenizer), "--input", str(corpus),
                "--output-prefix", str(tmp_path / "out" / "d")]
    else:
        args = ["tokenizer", "--base-tokenizer", str(llama2_tokenizer), "--domain-data", str(corpus),
                "--general-data", str(corpus), "--output", str(tmp_path / "out")]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "j.jsonl:2: field 'text' holds a lone surrogate (\\udfff" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any(p.name.endswith((".bin", ".idx"))
                                                      for p in (tmp_path / "out").iterdir())
