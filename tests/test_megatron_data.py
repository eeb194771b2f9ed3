"""Data stage: real corpora + the Llama 2 tokenizer -> megatron-core indexed datasets, read back exactly."""

from __future__ import annotations

import json
import shutil
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
