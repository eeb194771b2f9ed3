"""Export for NIM, its verification, and the smoke test against a real local OpenAI-compatible server.

The model is a small random LlamaForCausalLM; the tokenizer is a real SentencePiece BPE model trained here on
the general sample, extended the way the tokenizer stage does (NORMAL domain pieces, then reserved pieces up
to a multiple of 128), with HF files written by the tokenizer stage (dapt.tokenizer.write_hf_tokenizer).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest

from dapt.artifacts import stage_output, write_json
from dapt.cli import main
from dapt.config import DEFAULT_GENERAL_DATA
from dapt.corpus import DEFAULT_HELDOUT, SampleDataConfig, build_sample_data, iter_documents
from dapt.errors import UserInputError
from dapt.export import (
    LLAMA2_CHAT_TEMPLATE,
    ExportConfig,
    ExportError,
    export,
    nemo_to_hf_command,
    padded_vocab_sizes,
    verify_export,
)
from dapt.serve import check_serving_python, find_serving_python, free_port, local_server
from dapt.smoke_test import SmokeTestError, answer_text, merge_stream, parse_event_stream
from dapt.tokenizer import write_hf_tokenizer

DOMAIN_PIECES = ["▁module", "▁endmodule", "▁always_ff", "▁logic", "▁posedge", "▁assign", "▁wire", "▁reg"]
VOCAB = 512


@pytest.fixture(scope="module")
def sample_data() -> tuple[Path, Path]:
    """The embedded general sample and held-out files (written by `python -m dapt sample-data` if absent)."""
    if not any(DEFAULT_GENERAL_DATA.glob("*.jsonl")) or not any(DEFAULT_HELDOUT.rglob("*.jsonl")):
        build_sample_data(SampleDataConfig())
    return DEFAULT_GENERAL_DATA, DEFAULT_HELDOUT


def _train_base_proto(general: Path):
    import sentencepiece as spm

    from dapt.compat import sentencepiece_model_pb2 as model_pb2

    texts, size = [], 0
    for doc in iter_documents(general):
        texts.append(doc.text)
        size += len(doc.text)
        if size > 300_000:
            break
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buffer, vocab_size=384, model_type="bpe",
        byte_fallback=True, remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        max_sentence_length=100_000, num_threads=2, minloglevel=2,
    )
    proto = model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    return proto


def _extend(proto, domain_pieces: list[str] = DOMAIN_PIECES) -> list[dict]:
    """Append domain pieces (NORMAL, scores below the base ones) and reserved pieces up to VOCAB."""
    from dapt.compat import sentencepiece_model_pb2 as model_pb2

    piece_type = model_pb2.ModelProto.SentencePiece
    lowest = min(piece.score for piece in proto.pieces)
    base = {piece.piece for piece in proto.pieces}
    base_size = len(proto.pieces)
    added = []
    for rank, text in enumerate(t for t in domain_pieces if t not in base):
        proto.pieces.add(piece=text, score=lowest - 1 - rank, type=piece_type.NORMAL)
        added.append({"token": text, "id": len(proto.pieces) - 1, "kind": "domain", "domain_count": 1})
    while len(proto.pieces) < VOCAB:
        text = f"<extra_id_{len(proto.pieces) - base_size - len(added)}>"
        proto.pieces.add(piece=text, score=0.0, type=piece_type.USER_DEFINED)
    reserved = [{"token": p.piece, "id": i, "kind": "reserved", "domain_count": 0}
                for i, p in enumerate(proto.pieces) if i >= base_size + len(added)]
    return added + reserved


def _tokenizer_folder(final: Path, general: Path, domain_pieces: list[str] = DOMAIN_PIECES) -> Path:
    proto = _train_base_proto(general)
    base_size = len(proto.pieces)
    tokens = _extend(proto, domain_pieces)
    with stage_output(final, "tokenizer", {"test": True}, {}) as folder:
        (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
        write_hf_tokenizer(folder)  # the HF files exactly as the tokenizer stage writes them
        write_json(folder / "added_tokens.json",
                   {"base_vocab_size": base_size, "vocab_size": len(proto.pieces), "tokens": tokens})
    return final


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, sample_data) -> Path:
    """An adapted tokenizer folder in the tokenizer stage's layout (with its manifest)."""
    return _tokenizer_folder(tmp_path_factory.mktemp("tok") / "tokenizer", sample_data[0])


@pytest.fixture(scope="module")
def foreign_tokenizer_dir(tmp_path_factory, sample_data, tokenizer_dir) -> Path:
    """Another adapted tokenizer of the same size (VOCAB pieces) with other domain pieces."""
    other = ["▁input", "▁output", "▁begin", "▁end", "▁case", "▁default", "▁parameter", "▁localparam"]
    folder = _tokenizer_folder(tmp_path_factory.mktemp("foreign") / "tokenizer", sample_data[0], other)
    assert (folder / "tokenizer.model").read_bytes() != (tokenizer_dir / "tokenizer.model").read_bytes()
    return folder


def _make_model(folder: Path, rows: int, seed: int = 0, tokenizer: Path | None = None) -> Path:
    """A random Llama with ``rows`` embedding rows; with ``tokenizer``, its tokenizer.model beside the weights
    (as the train stage writes it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    if tokenizer is not None:
        shutil.copyfile(tokenizer / "tokenizer.model", folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir, sample_data) -> tuple[Path, dict, Path]:
    """Export a model whose vocabulary Megatron-style padding grew to 1024 rows (TP=8) for the 512 pieces."""
    root = tmp_path_factory.mktemp("export")
    source = _make_model(root / "dapt_model", rows=1024, tokenizer=tokenizer_dir)
    config = ExportConfig(source=source, tokenizer=tokenizer_dir, output=root / "export",
                          heldout=sample_data[1], heldout_docs=16, heldout_chars=2000)
    report = export(config)
    return root / "export", report, source


# --- export -----------------------------------------------------------------------------------------


def test_export_writes_a_consistent_folder(exported, tokenizer_dir):
    from safetensors.torch import load_file

    folder, report, source = exported
    assert report["passed"]
    assert report["source"]["padding_rows_stripped"] == 1024 - VOCAB
    assert not list(folder.glob("*.bin")) and not (folder / "added_tokens.json").exists()
    for name in ("tokenizer.model", "tokenizer.json", "special_tokens_map.json"):
        assert (folder / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    record = json.loads((folder / "dapt_added_tokens.json").read_text())
    assert record["vocab_size"] == VOCAB
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["bos_token_id"] == 1 and config["eos_token_id"] == 2
    weights, original = load_file(folder / "model.safetensors"), load_file(source / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert weights[name].shape[0] == VOCAB
        assert (weights[name] == original[name][:VOCAB]).all()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stage"] == "export" and manifest["inputs"]["tokenizer"]["stage"] == "tokenizer"
    verify = json.loads((folder / "verify.json").read_text())
    assert verify["passed"] and verify["checks"]["token_ids"]["documents"] > 0
    assert verify["checks"]["logits"]["max_abs_difference"] <= 1e-4
    assert verify["checks"]["generation"]["new_tokens"] > 0
    # no GPU here: verified on the CPU in float32 with --logits-tolerance, and the tolerances stated
    assert verify["placement"] == "CPU, float32"
    logits = verify["checks"]["logits"]
    assert logits["computed_in"] == "float32" and logits["tolerance"] == 1e-4 and logits["same_argmax"]
    assert set(verify["logit_tolerances"]) == {"float32", "bfloat16", "float16"}
    assert verify["checks"]["source_tokenizer"]["compared_with"] == [str(source / "tokenizer.model")]


def test_chat_template_renders_llama2_turns(exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported[0])
    assert tokenizer.chat_template == LLAMA2_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is a latch?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<s> [INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s>"
                        "<s> [INST] What is a latch? [/INST]")
    ids = tokenizer.apply_chat_template(messages[1:2], tokenize=True)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def _meta_llama2_chat_ids(sp, system: str, turns: list[str]) -> list[int]:
    """Meta's Llama 2 chat format: each (user, answer) pair is SentencePiece-encoded as
    "[INST] user [/INST] answer " between BOS and EOS, the last user turn as "[INST] user [/INST]" after BOS;
    the system text opens the first user turn inside <<SYS>>\n ... \n<</SYS>>\n\n."""
    turns = [f"<<SYS>>\n{system}\n<</SYS>>\n\n{turns[0]}", *turns[1:]]
    ids = []
    for user, answer in zip(turns[:-1:2], turns[1::2]):
        ids += [sp.bos_id(), *sp.encode(f"[INST] {user} [/INST] {answer} "), sp.eos_id()]
    return ids + [sp.bos_id(), *sp.encode(f"[INST] {turns[-1]} [/INST]")]


def test_chat_template_gives_metas_llama2_chat_token_ids(exported):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported[0])
    sp = spm.SentencePieceProcessor(model_file=str(exported[0] / "tokenizer.model"))
    turns = ["Write a counter.", "module counter; endmodule", "Add a reset: always_ff @(posedge clk)"]
    messages = [{"role": "system", "content": "You write SystemVerilog."}]
    messages += [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert list(ids) == _meta_llama2_chat_ids(sp, "You write SystemVerilog.", turns)


def test_verify_catches_an_hf_tokenizer_that_disagrees_with_sentencepiece(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported[0], broken)
    # a conversion pitfall: a fast tokenizer that prepends no "▁", unlike SentencePiece's dummy prefix
    tokenizer_json = json.loads((broken / "tokenizer.json").read_text())
    assert tokenizer_json["pre_tokenizer"]["prepend_scheme"] == "first"  # as written by the tokenizer stage
    tokenizer_json["pre_tokenizer"]["prepend_scheme"] = "never"
    (broken / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    report = verify_export(broken, texts=["module top;\n  wire a;\nendmodule\n", "Plain words here."])
    assert not report["passed"]
    assert report["checks"]["token_ids"]["mismatched_documents"] == 2
    assert report["checks"]["vocab_size"]["passed"]


def test_verify_catches_config_vocab_that_disagrees_with_weights(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported[0], broken)
    config = json.loads((broken / "config.json").read_text())
    config["vocab_size"] = VOCAB + 128
    (broken / "config.json").write_text(json.dumps(config))
    report = verify_export(broken, texts=["module top;"])
    assert not report["passed"]
    assert report["checks"]["vocab_size"]["sizes"]["config.vocab_size"] == VOCAB + 128
    assert not report["checks"]["vocab_size"]["passed"] and not report["checks"]["loads"]["passed"]


@pytest.mark.parametrize("rows", [384, 640])
def test_export_refuses_a_tokenizer_that_does_not_match_the_weights(rows, tmp_path, tokenizer_dir,
                                                                   sample_data, capsys):
    source = _make_model(tmp_path / "model", rows=rows, tokenizer=tokenizer_dir)
    status = main(["export", "--source", str(source), "--tokenizer", str(tokenizer_dir),
                   "--output", str(tmp_path / "export"), "--heldout", str(sample_data[1])])
    error = capsys.readouterr().err
    assert status == 2
    assert "does not belong to these weights" in error and f"{rows} embedding rows" in error
    assert not (tmp_path / "export").exists()


def test_export_refuses_a_source_trained_with_another_tokenizer(tmp_path, tokenizer_dir, sample_data):
    source = _make_model(tmp_path / "model", rows=VOCAB)
    shutil.copyfile(DEFAULT_GENERAL_DATA / "README.md", source / "tokenizer.model")
    config = ExportConfig(source=source, tokenizer=tokenizer_dir, output=tmp_path / "export",
                          heldout=sample_data[1])
    with pytest.raises(ExportError, match=r"is not the tokenizer the model in .* was trained with"):
        export(config)


def test_export_refuses_a_missing_tokenizer(tmp_path, capsys):
    status = main(["export", "--source", str(tmp_path), "--tokenizer", str(tmp_path / "nope"),
                   "--output", str(tmp_path / "export")])
    assert status == 2 and "tokenizer folder" in capsys.readouterr().err
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "tokenizer.json").write_text("{}")
    status = main(["export", "--source", str(tmp_path), "--tokenizer", str(incomplete),
                   "--output", str(tmp_path / "export")])
    error = capsys.readouterr().err
    assert status == 2 and "lacks tokenizer.model" in error


def _nemo_checkpoint(path: Path, tokenizer_model: Path, packed: bool = True) -> Path:
    """A checkpoint laid out as NeMo 24.07 saves one: model_config.yaml naming the tokenizer artifact
    "nemo:<32 hex>_tokenizer.model", the artifact itself, and the weights (here a stand-in file).
    ``packed``: a .nemo tar (members "./...", as NeMo writes it); else its extracted folder."""
    import tarfile

    import yaml

    artifact = "0123456789abcdef0123456789abcdef_tokenizer.model"
    config = {"precision": "bf16", "tokenizer": {"library": "sentencepiece", "type": None,
                                                 "model": f"nemo:{artifact}", "sentencepiece_legacy": False}}
    folder = path.with_suffix(".extracted") if packed else path
    folder.mkdir(parents=True)
    (folder / "model_config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    shutil.copyfile(tokenizer_model, folder / artifact)
    (folder / "model_weights.ckpt").write_bytes(b"weights stand-in")
    if not packed:
        return folder
    with tarfile.open(path, "w:") as archive:
        archive.add(folder, arcname=".")
    shutil.rmtree(folder)
    return path


def _without_nemo():
    import importlib.util

    if importlib.util.find_spec("nemo") is not None:
        pytest.skip("NeMo is installed here; this test covers machines without it")


@pytest.mark.parametrize("packed", [True, False], ids=["nemo-file", "extracted-folder"])
def test_nemo_source_says_plainly_that_nemo_is_needed(packed, tmp_path, tokenizer_dir, sample_data, exported):
    _without_nemo()
    checkpoint = _nemo_checkpoint(tmp_path / "dapt.nemo", tokenizer_dir / "tokenizer.model", packed)
    config = ExportConfig(source=checkpoint, tokenizer=tokenizer_dir, output=tmp_path / "export",
                          base_hf_model=exported[2], heldout=sample_data[1], nemo_root=tmp_path / "NeMo")
    with pytest.raises(ExportError, match="needs NeMo, which this machine does not have") as caught:
        export(config)  # the packed tokenizer is the one passed: the export goes as far as the conversion
    assert "convert_llama_nemo_to_hf.py --input_name_or_path" in str(caught.value)


@pytest.mark.parametrize("packed", [True, False], ids=["nemo-file", "extracted-folder"])
def test_a_foreign_tokenizer_of_the_same_size_is_refused_for_a_nemo_source(
        packed, tmp_path, tokenizer_dir, foreign_tokenizer_dir, sample_data, exported, capsys):
    checkpoint = _nemo_checkpoint(tmp_path / "dapt.nemo", tokenizer_dir / "tokenizer.model", packed)
    status = main(["export", "--source", str(checkpoint), "--tokenizer", str(foreign_tokenizer_dir),
                   "--output", str(tmp_path / "export"), "--base-hf-model", str(exported[2]),
                   "--heldout", str(sample_data[1]), "--nemo-root", str(tmp_path / "NeMo")])
    error = capsys.readouterr().err
    assert status == 2, error
    assert f"--tokenizer {foreign_tokenizer_dir}" in error and "was trained with" in error
    assert "0123456789abcdef0123456789abcdef_tokenizer.model" in error  # names the packed tokenizer
    assert not (tmp_path / "export").exists()


def _trained_folder_without_tokenizer_model(folder: Path, tokenizer: Path) -> Path:
    """What `python -m dapt train` writes, less its tokenizer.model: the manifest records the tokenizer's SHA-256."""
    from dapt.artifacts import file_sha256

    with stage_output(folder, "train", {"test": True},
                      {"model": {"tokenizer_sha256": file_sha256(tokenizer / "tokenizer.model")}}) as tmp:
        _make_model(tmp, rows=VOCAB)
    return folder


def test_a_foreign_tokenizer_of_the_same_size_is_refused_by_the_training_manifest(
        tmp_path, tokenizer_dir, foreign_tokenizer_dir, sample_data, capsys):
    source = _trained_folder_without_tokenizer_model(tmp_path / "dapt_model", tokenizer_dir)
    status = main(["export", "--source", str(source), "--tokenizer", str(foreign_tokenizer_dir),
                   "--output", str(tmp_path / "export"), "--heldout", str(sample_data[1])])
    error = capsys.readouterr().err
    assert status == 2, error
    assert f"--tokenizer {foreign_tokenizer_dir}" in error and "manifest.json (train stage)" in error
    assert not (tmp_path / "export").exists()
    # the tokenizer the manifest records passes, and verify.json says what it was compared with
    report = export(ExportConfig(source=source, tokenizer=tokenizer_dir, output=tmp_path / "export",
                                 heldout=sample_data[1], heldout_docs=4, heldout_chars=500))
    check = report["checks"]["source_tokenizer"]
    assert report["passed"] and check["compared_with"] == [f"{source / 'manifest.json'} (train stage)"]


def test_a_source_without_any_tokenizer_record_is_refused_unless_allowed(tmp_path, tokenizer_dir, sample_data):
    source = _make_model(tmp_path / "model", rows=VOCAB)  # an HF folder from elsewhere: no tokenizer, no manifest
    config = ExportConfig(source=source, tokenizer=tokenizer_dir, output=tmp_path / "export",
                          heldout=sample_data[1], heldout_docs=4, heldout_chars=500)
    with pytest.raises(ExportError, match="keeps no record of its tokenizer.*--allow-unverified-tokenizer"):
        export(config)
    config.allow_unverified_tokenizer = True
    report = export(config)
    assert report["passed"] and "unverified" in report["checks"]["source_tokenizer"]


def test_nemo_command_uses_the_converter_arguments():
    command = nemo_to_hf_command(Path("/r/dapt.nemo"), Path("/w/weights.bin"), Path("/opt/NeMo"), "bfloat16",
                                 cpu_only=True)
    assert command[1] == "/opt/NeMo/scripts/checkpoint_converters/convert_llama_nemo_to_hf.py"
    assert command[2:] == ["--input_name_or_path", "/r/dapt.nemo", "--output_path", "/w/weights.bin",
                           "--precision", "bf16", "--cpu-only"]
    assert "--precision" not in nemo_to_hf_command(Path("a"), Path("b"), Path("c"), "auto")


def test_padded_vocab_sizes_follow_megatron():
    assert padded_vocab_sizes(512, 8) == [512, 1024]
    assert padded_vocab_sizes(32005, 8) == [32128, 32256, 32768]
    assert padded_vocab_sizes(33024, 2) == [33024]


# --- smoke test -------------------------------------------------------------------------------------


def test_answer_shapes_are_checked():
    assert answer_text("completion", {"choices": [{"text": " x", "finish_reason": "length"}]}) == " x"
    chat = {"choices": [{"message": {"role": "assistant", "content": "y"}, "finish_reason": "stop"}]}
    assert answer_text("chat", chat) == "y"
    with pytest.raises(SmokeTestError, match="no choices"):
        answer_text("completion", {"choices": []})
    with pytest.raises(SmokeTestError, match="assistant"):
        answer_text("chat", {"choices": [{"message": {"role": "user", "content": "y"}}]})
    with pytest.raises(SmokeTestError, match="empty"):
        answer_text("completion", {"choices": [{"text": "", "finish_reason": "length"}]})
    events = parse_event_stream(b'data: {"a": 1}\n\n: comment\ndata: {"b": 2}\n\ndata: [DONE]\n\n')
    assert events == [{"a": 1}, {"b": 2}]


def test_a_stream_that_breaks_off_fails_the_smoke_test():
    chunk = {"object": "text_completion", "choices": [{"index": 0, "text": "x"}]}
    final = {"object": "text_completion", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
    assert merge_stream("completion", [chunk, final])["choices"][0] == {"text": "x", "finish_reason": "length"}
    # what transformers serve 5.24 sends when its stream decoder fails (see docs/troubleshooting.md)
    broken = {"error": "Invalid prefix encountered while decoding stream. Token ID: 385"}
    with pytest.raises(SmokeTestError, match="broke off after 1 chunks.*Invalid prefix"):
        merge_stream("completion", [chunk, broken])
    with pytest.raises(SmokeTestError, match="without a final chunk"):
        merge_stream("completion", [chunk, chunk])


def test_smoke_test_reports_an_unreachable_endpoint(capsys):
    status = main(["smoke-test", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--model", "m",
                   "--timeout-s", "5"])
    assert status == 2 and "cannot reach" in capsys.readouterr().err


def test_an_interpreter_without_a_completions_server_is_refused_with_the_fix():
    # this test environment's transformers (4.57 fresh, 4.40 container) has no /v1/completions server
    with pytest.raises(UserInputError, match="setup_env.sh serve"):
        check_serving_python(Path(sys.executable))
    with pytest.raises(UserInputError, match="no such interpreter"):
        check_serving_python(Path("/nonexistent/bin/python"))


def _serving_python_or_skip() -> Path:
    """The serving environment's interpreter; CI sets DAPT_REQUIRE_SERVE=1 so that its absence fails."""
    python = find_serving_python()
    try:
        check_serving_python(python)
    except UserInputError as error:
        if os.environ.get("DAPT_REQUIRE_SERVE") == "1":
            pytest.fail(f"DAPT_REQUIRE_SERVE=1, but {error}")
        pytest.skip(str(error))
    return python


def _without_high_byte_pieces(export_folder: Path, folder: Path) -> Path:
    """A copy of the export whose generation config never picks the byte pieces <0x80>..<0xFF>.

    The export's weights are random, so greedy decoding emits lone non-ASCII bytes that no UTF-8 text holds.
    transformers serve's stream decoder aborts on those mid-stream (docs/troubleshooting.md; the smoke test
    reports it, see test_a_stream_that_breaks_off_fails_the_smoke_test). A trained model writes valid UTF-8.
    """
    from transformers import AutoTokenizer, GenerationConfig

    shutil.copytree(export_folder, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generation = GenerationConfig.from_pretrained(folder)
    generation.suppress_tokens = tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(0x80, 0x100)])
    generation.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served_export(exported, tmp_path_factory):
    """`transformers serve` (the serving environment) on the exported model, loopback only, for this module."""
    python = _serving_python_or_skip()
    root = tmp_path_factory.mktemp("serve")
    folder = _without_high_byte_pieces(exported[0], root / "export")
    with local_server(folder, python, log=root / "server.log") as base_url:
        yield base_url, folder


@pytest.mark.parametrize("stream", [False, True])
def test_smoke_test_against_a_local_openai_compatible_server(served_export, tmp_path, capsys, stream):
    base_url, folder = served_export
    status = main(["smoke-test", "--base-url", base_url, "--tokenizer", str(folder), "--max-tokens", "8",
                   "--timeout-s", "60", "--stream" if stream else "--no-stream", "--output", str(tmp_path)])
    assert status == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "smoke_test.json").read_text())
    # no --model: the smoke test takes the one GET /v1/models lists, the served export
    assert report["passed"] and report["model"] == str(folder) and report["model_listed"]
    assert report["checks"]["prompt_round_trip"]["passed"]
    for kind in ("completion", "chat"):
        check = report["checks"][kind]
        assert check["passed"] and check["round_trip"]["passed"], (kind, check)
        assert check["prompt_tokens"]["passed"] and check["prompt_tokens"]["server"] > 0, (kind, check)
        assert 0 < check["usage"]["completion_tokens"] <= 8
        assert (check["streamed_chunks"] or 0) >= (2 if stream else 0)


def _post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("frequency_penalty", [0.0, 0.5])
def test_the_served_model_is_the_export(served_export, frequency_penalty):
    """A greedy completion from the server equals the export's greedy continuation computed here (with the
    smoke test's frequency_penalty 0.5, which transformers serve applies as repetition_penalty 1.5)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_url, folder = served_export
    prompt = "module counter (input logic clk, output logic [7:0] count);"
    answer = _post_json(f"{base_url}/completions",
                        {"model": str(folder), "prompt": prompt, "max_tokens": 12, "temperature": 0.0,
                         "frequency_penalty": frequency_penalty})
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, repetition_penalty=1 + frequency_penalty,
                         pad_token_id=tokenizer.eos_token_id)
    local = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer["choices"][0]["text"] == local
    assert answer["usage"]["prompt_tokens"] == ids["input_ids"].shape[1]


def test_smoke_test_fails_clearly_for_a_model_the_server_does_not_serve(served_export, capsys):
    base_url, folder = served_export
    status = main(["smoke-test", "--base-url", base_url, "--model", "llama-2-7b-chipdesign",
                   "--max-tokens", "4", "--timeout-s", "60"])
    error = capsys.readouterr().err
    assert status == 2 and "answered HTTP 4" in error and "llama-2-7b-chipdesign" in error


def test_a_killed_serve_command_stops_its_server(exported, tmp_path):
    import signal
    import subprocess

    from dapt.serve import check_address

    python = _serving_python_or_skip()
    command = [sys.executable, "-m", "dapt", "serve", "--model", str(exported[0]), "--python", str(python)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as serve:
        first = serve.stdout.readline()
        assert first.startswith("serving "), first + serve.stdout.read()
        port = int(first.split("http://127.0.0.1:")[1].split("/")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 128 + signal.SIGTERM
    check_address("127.0.0.1", port)  # nobody listens there any more: the server went with the command


def test_local_server_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(UserInputError, match="config.json"), local_server(tmp_path):
        pass


def test_export_of_a_model_with_tied_embeddings(tmp_path, tokenizer_dir, sample_data):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    shutil.copyfile(tokenizer_dir / "tokenizer.model", tmp_path / "tied" / "tokenizer.model")
    report = export(ExportConfig(source=tmp_path / "tied", tokenizer=tokenizer_dir,
                                 output=tmp_path / "export", heldout=sample_data[1], heldout_docs=4,
                                 heldout_chars=500))
    assert report["passed"] and report["source"]["padding_rows_stripped"] == 0
    assert report["checks"]["vocab_size"]["sizes"] == {
        "config.vocab_size": VOCAB, "sentencepiece": VOCAB, "hf_tokenizer": VOCAB,
        "model.embed_tokens.weight": VOCAB}


def test_a_bf16_source_is_verified_in_float32_on_the_cpu_and_exported_in_bf16(tmp_path, tokenizer_dir, sample_data):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    source = _make_model(tmp_path / "model", rows=VOCAB, tokenizer=tokenizer_dir)
    AutoModelForCausalLM.from_pretrained(source).to(torch.bfloat16).save_pretrained(source)
    report = export(ExportConfig(source=source, tokenizer=tokenizer_dir, output=tmp_path / "export",
                                 heldout=sample_data[1], heldout_docs=4, heldout_chars=500))
    logits = report["checks"]["logits"]
    # both sides computed in float32 from the same bf16 weights (cast up exactly): no difference at all
    assert report["passed"] and logits["computed_in"] == "float32" and logits["max_abs_difference"] == 0.0
    weights = load_file(tmp_path / "export" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}  # the weights keep their dtype


def test_the_logit_tolerance_follows_the_precision():
    import torch

    from dapt.export import logit_tolerance

    reference = torch.tensor([[3.0, -20.0, 0.5]])
    assert logit_tolerance(torch.float32, reference, 1e-4) == (1e-4, "float32: --logits-tolerance")
    bf16, rule = logit_tolerance(torch.bfloat16, reference, 1e-4)
    assert bf16 == 4 * 2**-7 * 20.0 and rule.startswith("bfloat16: 4 x eps (0.0078125)")
    assert logit_tolerance(torch.float16, reference, 1e-4)[0] == 4 * 2**-10 * 20.0


@pytest.mark.parametrize(("option", "value"), [
    ("--max-tensor-parallel", "0"), ("--max-tensor-parallel", "-2"), ("--heldout-docs", "0"),
    ("--heldout-chars", "0"), ("--probe-tokens", "0"), ("--generate-tokens", "0"),
    ("--logits-tolerance", "-1"), ("--logits-tolerance", "nan"), ("--profile", "llama2-8b"),
])
def test_export_refuses_numbers_that_cannot_work(option, value, tmp_path, tokenizer_dir, capsys):
    status = main(["export", "--source", str(tmp_path), "--tokenizer", str(tokenizer_dir),
                   "--output", str(tmp_path / "export"), option, value])
    error = capsys.readouterr().err
    assert status == 2 and f"{option} {value}" in error, error
    assert not (tmp_path / "export").exists()


def test_generated_text_is_round_tripped_after_its_prompt(tokenizer_dir) -> None:
    """A completion that starts with a space is no fault: checked after its prompt, it comes back whole."""
    from transformers import AutoTokenizer

    from dapt.smoke_test import _round_trip

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = " state_q <= 1'b0;\n  end"
    alone = _round_trip(tokenizer, text)
    assert not alone["passed"] and alone["decoded"] == text[1:], "SentencePiece drops the dummy-prefix space"
    in_context = _round_trip(tokenizer, text, context="module counter (\n  input  logic clk,\n")
    assert in_context["passed"] and in_context["decoded"] == text

    class Lossy:  # a tokenizer that loses a character: the check must say so
        def encode(self, text: str, add_special_tokens: bool) -> list[int]:
            return [ord(c) for c in text]

        def decode(self, ids: list[int], **kwargs) -> str:
            return "".join(chr(i) for i in ids if chr(i) != "q")

    lossy = _round_trip(Lossy(), text, context="x")
    assert not lossy["passed"] and "does not give this text back" in lossy["error"]
