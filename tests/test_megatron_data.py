"""Data stage: real corpora + the Llama 2 tokenizer -> megatron-core indexed datasets, read back exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from dapt.artifacts import file_sha256
from dapt.corpus import iter_documents
from dapt.errors import UserInputError
from dapt.megatron_data import (
    SPLITS,
    DataConfig,
    DataMismatchError,
    assign_splits,
    build_blend,
    build_megatron_data,
    check_data_matches_tokenizer,
    iter_split_tokens,
    load_sentencepiece,
    sidecar_path,
    split_prefix,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, llama2_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    shutil.copy(llama2_tokenizer, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def domain_heldout(shared_data) -> Path:
    return shared_data / "heldout" / "domain_heldout.jsonl"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_dir, domain_heldout) -> tuple[DataConfig, dict]:
    prefix = tmp_path_factory.mktemp("data") / "domain"
    config = DataConfig(tokenizer=tokenizer_dir, input=domain_heldout, output_prefix=prefix,
                        split_percent=(90.0, 5.0, 5.0), seed=7, workers=2)
    return config, build_megatron_data(config)


def test_read_back_equals_sentencepiece_ids_plus_eod(built, tokenizer_dir, domain_heldout) -> None:
    config, record = built
    sp = load_sentencepiece(tokenizer_dir / "tokenizer.model")
    texts = [doc.text for doc in iter_documents(domain_heldout)]
    assignment = assign_splits(len(texts), config.split_percent, config.seed)
    for index, split in enumerate(SPLITS):
        expected = [sp.encode(text) + [sp.eos_id()] for text, where in zip(texts, assignment, strict=True)
                    if where == index]
        got = [doc.tolist() for doc in iter_split_tokens(config.output_prefix, split)]
        assert got == expected, split
        assert record["splits"][split] == {"documents": len(expected), "tokens": sum(map(len, expected))}
    assert sum(record["splits"][s]["documents"] for s in SPLITS) == len(texts)
    assert all(record["splits"][s]["documents"] > 0 for s in SPLITS)


def test_sidecar_records_tokenizer_and_dtype(built, tokenizer_dir) -> None:
    config, record = built
    on_disk = json.loads(sidecar_path(config.output_prefix).read_text())
    assert on_disk == record
    assert record["tokenizer_sha256"] == file_sha256(tokenizer_dir / "tokenizer.model")
    assert (record["vocab_size"], record["eod_id"], record["dtype"]) == (32000, 2, "uint16")
    data = np.fromfile(split_prefix(config.output_prefix, "train") + ".bin", dtype=np.uint16)
    assert data.size == record["splits"]["train"]["tokens"]
    assert not list(Path(config.output_prefix).parent.glob(".*partial"))


def test_mismatched_tokenizer_and_changed_files_are_refused(built, tokenizer_dir, stories260k,
                                                            tmp_path) -> None:
    config, _ = built
    assert check_data_matches_tokenizer(config.output_prefix, tokenizer_dir)["vocab_size"] == 32000
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(stories260k / "tok512.model", other / "tokenizer.model")
    with pytest.raises(DataMismatchError, match="built with tokenizer"):
        check_data_matches_tokenizer(config.output_prefix, other)
    with pytest.raises(DataMismatchError, match="does not exist"):
        check_data_matches_tokenizer(tmp_path / "nothing", tokenizer_dir)
    copy = tmp_path / "copy" / "domain"
    copy.parent.mkdir()
    for path in Path(config.output_prefix).parent.glob("domain*"):
        shutil.copy(path, copy.parent / path.name)
    with open(split_prefix(copy, "test") + ".idx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(DataMismatchError, match="differ from what"):
        check_data_matches_tokenizer(copy, tokenizer_dir)


def test_rerun_replaces_and_zero_percent_split_is_empty(tokenizer_dir, shared_data, tmp_path) -> None:
    prefix = tmp_path / "general"
    first = build_megatron_data(DataConfig(tokenizer=tokenizer_dir, input=shared_data / "heldout" /
                                           "general_heldout.jsonl", output_prefix=prefix, workers=1,
                                           split_percent=(80.0, 20.0, 0.0)))
    assert first["splits"]["test"] == {"documents": 0, "tokens": 0}
    assert list(iter_split_tokens(prefix, "test")) == []
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"module m{i}; endmodule"}) + "\n" for i in range(3)))
    second = build_megatron_data(DataConfig(tokenizer=tokenizer_dir, input=small, output_prefix=prefix,
                                            workers=1, split_percent=(34.0, 33.0, 33.0)))
    assert {s: second["splits"][s]["documents"] for s in SPLITS} == {"train": 1, "validation": 1, "test": 1}
    assert sum(len(list(iter_split_tokens(prefix, s))) for s in SPLITS) == 3
    assert json.loads(sidecar_path(prefix).read_text())["input"] == str(small)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_bad_inputs_are_refused_clearly(tokenizer_dir, tmp_path) -> None:
    two = tmp_path / "two.jsonl"
    two.write_text('{"text": "a"}\n{"text": "b"}\n')
    out = tmp_path / "out"
    with pytest.raises(UserInputError, match="too few to give train"):
        build_megatron_data(DataConfig(tokenizer=tokenizer_dir, input=two, output_prefix=out, workers=1))
    with pytest.raises(UserInputError, match="sum must be 100"):
        build_megatron_data(DataConfig(tokenizer=tokenizer_dir, input=two, output_prefix=out,
                                       split_percent=(90.0, 5.0, 1.0)))
    with pytest.raises(UserInputError, match="tokenizer.model"):
        build_megatron_data(DataConfig(tokenizer=tmp_path, input=two, output_prefix=out))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(UserInputError, match="bad.jsonl:1"):
        build_megatron_data(DataConfig(tokenizer=tokenizer_dir, input=bad, output_prefix=out))
    # nothing written, not even the lock file (removed when the stage ends)
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_blend_is_what_megatron_parses() -> None:
    from megatron.core.datasets.utils import get_blend_from_list

    blend = build_blend("/d/domain", "/d/general", 0.09)
    assert set(blend) == set(SPLITS)
    prefixes, weights = get_blend_from_list(blend["train"])
    assert prefixes == ["/d/domain_train_text_document", "/d/general_train_text_document"]
    assert weights == pytest.approx([0.91, 0.09])
    assert build_blend("/d/domain", None, 0.0)["validation"] == ["1", "/d/domain_validation_text_document"]
    with pytest.raises(UserInputError, match="needs a general data prefix"):
        build_blend("/d/domain", None, 0.09)


# --- long documents, bad numbers, locks, leftovers and permissions (issue 12, items 5, 9, 14-16) -------------


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _read_all(prefix: Path) -> list[list[int]]:
    return [doc.tolist() for split in SPLITS for doc in iter_split_tokens(prefix, split)]


@pytest.mark.parametrize("workers", [1, 2])
def test_long_documents_are_encoded_in_pieces_with_the_ids_of_the_whole(
        tokenizer_dir, domain_heldout, tmp_path, monkeypatch, workers) -> None:
    from dapt import megatron_data

    long_text = "\n".join(doc.text for doc in iter_documents(domain_heldout))  # 630 kB of real RTL and docs
    texts = ["module short; endmodule", long_text, "assign a = b;", long_text[:9000]]
    corpus = _write_jsonl(tmp_path / "long.jsonl", texts)
    sp = load_sentencepiece(tokenizer_dir / "tokenizer.model")
    expected = [sp.encode(t) + [sp.eos_id()] for t in texts]
    uncut = tmp_path / "uncut" / "d"
    config = DataConfig(tokenizer=tokenizer_dir, input=corpus, output_prefix=uncut, workers=workers,
                        split_percent=(100.0, 0.0, 0.0))
    monkeypatch.setattr(megatron_data, "_PIECE_CHARS", 10**9)  # every document whole, through add_document
    build_megatron_data(config)
    monkeypatch.setattr(megatron_data, "_PIECE_CHARS", 1000)  # 630 pieces for the long document
    cut = tmp_path / "cut" / "d"
    record = build_megatron_data(DataConfig(**{**config.__dict__, "output_prefix": cut}))
    assert _read_all(cut) == expected
    assert record["splits"]["train"] == {"documents": 4, "tokens": sum(map(len, expected))}
    for suffix in (".bin", ".idx"):  # written piece by piece: the same bytes as add_document of the whole
        assert file_sha256(split_prefix(cut, "train") + suffix) == file_sha256(split_prefix(uncut, "train") + suffix)


def test_a_document_that_cannot_be_cut_is_refused_with_file_and_line(tokenizer_dir, tmp_path, monkeypatch,
                                                                       capsys) -> None:
    from dapt import megatron_data
    from dapt.cli import main as cli

    monkeypatch.setattr(megatron_data, "_PIECE_CHARS", 1000)
    monkeypatch.setattr(megatron_data, "_MAX_PIECE_CHARS", 8000)
    corpus = _write_jsonl(tmp_path / "dna.jsonl", ["module a; endmodule", "ACGT" * 5000])
    prefix = tmp_path / "out" / "d"
    assert cli(["data", "--tokenizer", str(tokenizer_dir), "--input", str(corpus), "--output-prefix",
                str(prefix), "--workers", "1", "--split-percent", "100", "0", "0"]) == 2
    assert f"{corpus}:2: no place to cut in the 8,000 characters from character 0" in capsys.readouterr().err
    assert sorted(p.name for p in prefix.parent.iterdir()) == []


@pytest.mark.parametrize(("option", "value", "message"), [
    ("workers", -1, r"--workers -1: give 0 \(one process per available CPU\)"),
    ("seed", -5, "--seed -5: the split's seed must be an integer >= 0"),
    ("split_percent", (0.0, 50.0, 50.0), r"--split-percent \[0.0, 50.0, 50.0\]: the train share"),
    ("split_percent", (float("nan"), 1.0, 1.0), r"--split-percent \[nan, 1.0, 1.0\]: each share"),
    ("text_keys", (), "--text-keys: give at least one JSON key"),
])
def test_numbers_that_cannot_work_are_refused_with_the_value(tokenizer_dir, domain_heldout, tmp_path, option,
                                                             value, message) -> None:
    config = DataConfig(tokenizer=tokenizer_dir, input=domain_heldout, output_prefix=tmp_path / "o" / "d")
    setattr(config, option, value)
    with pytest.raises(UserInputError, match=message):
        build_megatron_data(config)
    assert not (tmp_path / "o").exists()


def test_workers_zero_means_every_available_cpu() -> None:
    from dapt.megatron_data import resolve_workers

    assert resolve_workers(0) == len(os.sched_getaffinity(0))
    assert (resolve_workers(1), resolve_workers(3)) == (1, 3)


def _data_command(tokenizer_dir: Path, corpus: Path, prefix: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dapt", "data", "--tokenizer", str(tokenizer_dir), "--input", str(corpus),
            "--output-prefix", str(prefix), *extra]


def test_a_second_run_into_the_same_prefix_is_refused_while_the_first_writes(built, tokenizer_dir,
                                                                              domain_heldout) -> None:
    from dapt.artifacts import output_lock

    config, _ = built
    before = {p.name: file_sha256(p) for p in Path(config.output_prefix).parent.glob("domain*")}
    with output_lock(config.output_prefix, "data"):  # as a first `data` run holds it while it writes
        result = subprocess.run(_data_command(tokenizer_dir, domain_heldout, config.output_prefix),
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "is being written right now by another `python -m dapt data` (pid" in result.stderr
    assert "Traceback" not in result.stderr
    assert {p.name: file_sha256(p) for p in Path(config.output_prefix).parent.glob("domain*")} == before


def test_a_killed_runs_partial_files_are_removed_by_the_next_run(tokenizer_dir, shared_data, tmp_path) -> None:
    prefix = tmp_path / "out" / "domain"
    command = _data_command(tokenizer_dir, shared_data / "domain" / "ibex.jsonl", prefix, "--workers", "1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(prefix.parent.glob(".*.partial")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    left = sorted(p.name for p in prefix.parent.glob(".*.partial"))
    assert left, "the run was not caught while writing"
    other = prefix.parent / ".domain_x_train_text_document.bin.123-abcdef01.partial"  # another prefix's
    other.write_bytes(b"")
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in prefix.parent.glob(".*.partial")) == [other.name]
    assert check_data_matches_tokenizer(prefix, tokenizer_dir)["splits"]["train"]["documents"] > 0


def test_finished_files_follow_the_umask_and_other_users_can_read_them(tokenizer_dir, domain_heldout) -> None:
    root = Path(tempfile.mkdtemp(prefix="dapt-umask-", dir="/tmp"))  # outside pytest's private 0700 folder
    old = os.umask(0o027)
    try:
        build_megatron_data(DataConfig(tokenizer=tokenizer_dir, input=domain_heldout, workers=1,
                                       output_prefix=root / "private" / "d"))
        os.umask(0o022)
        build_megatron_data(DataConfig(tokenizer=tokenizer_dir, input=domain_heldout, workers=1,
                                       output_prefix=root / "shared" / "d"))
    finally:
        os.umask(old)
    try:
        for folder, mode in (("private", 0o640), ("shared", 0o644)):
            files = [p for p in (root / folder).iterdir() if not p.name.endswith(".lock")]
            assert len(files) == 7
            assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(mode)}, folder
        if os.geteuid() == 0:  # read them as another user (nobody), as a NeMo or NIM container would
            os.chmod(root, 0o755)
            files = [str(p) for p in (root / "shared").iterdir() if not p.name.endswith(".lock")]
            nobody = subprocess.run(["head", "-c", "1", *files], user=65534, group=65534, capture_output=True)
            assert nobody.returncode == 0, nobody.stderr
    finally:
        shutil.rmtree(root)
