"""Export for NIM, its verification, and the smoke test against a real local OpenAI-compatible server.

The model is a small random LlamaForCausalLM; the tokenizer is a real SentencePiece BPE model trained here on
the general sample, extended the way the tokenizer stage does (NORMAL domain pieces, then reserved pieces up
to a multiple of 128), with HF files converted by transformers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dapt.artifacts import stage_output, write_json
from dapt.cli import main
from dapt.config import DEFAULT_GENERAL_DATA
from dapt.corpus import DEFAULT_HELDOUT, SampleDataConfig, build_sample_data, iter_documents
from dapt.export import (
    LLAMA2_CHAT_TEMPLATE,
    ExportConfig,
    ExportError,
    SmokeTestError,
    answer_text,
    export,
    nemo_to_hf_command,
    padded_vocab_sizes,
    parse_event_stream,
    verify_export,
)

DOMAIN_PIECES = ["▁module", "▁endmodule", "▁always_ff", "▁logic", "▁posedge", "▁assign", "▁wire", "▁reg"]
VOCAB = 512
SERVER_START_TIMEOUT_S = 120


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


def _extend(proto) -> list[dict]:
    """Append domain pieces (NORMAL, scores below the base ones) and reserved pieces up to VOCAB."""
    from dapt.compat import sentencepiece_model_pb2 as model_pb2

    piece_type = model_pb2.ModelProto.SentencePiece
    lowest = min(piece.score for piece in proto.pieces)
    base = {piece.piece for piece in proto.pieces}
    base_size = len(proto.pieces)
    added = []
    for rank, text in enumerate(t for t in DOMAIN_PIECES if t not in base):
        proto.pieces.add(piece=text, score=lowest - 1 - rank, type=piece_type.NORMAL)
        added.append({"token": text, "id": len(proto.pieces) - 1, "kind": "domain", "domain_count": 1})
    while len(proto.pieces) < VOCAB:
        text = f"<extra_id_{len(proto.pieces) - base_size - len(added)}>"
        proto.pieces.add(piece=text, score=0.0, type=piece_type.USER_DEFINED)
    reserved = [{"token": p.piece, "id": i, "kind": "reserved", "domain_count": 0}
                for i, p in enumerate(proto.pieces) if i >= base_size + len(added)]
    return added + reserved


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, sample_data) -> Path:
    """An adapted tokenizer folder in the tokenizer stage's layout (with its manifest)."""
    from transformers import LlamaTokenizerFast

    general, _ = sample_data
    proto = _train_base_proto(general)
    base_size = len(proto.pieces)
    tokens = _extend(proto)
    final = tmp_path_factory.mktemp("tok") / "tokenizer"
    with stage_output(final, "tokenizer", {"test": True}, {}) as folder:
        (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
        # add_prefix_space=True makes the converted Metaspace prepend "▁" as SentencePiece's dummy prefix does
        hf = LlamaTokenizerFast(vocab_file=str(folder / "tokenizer.model"), legacy=False,
                                add_prefix_space=True)
        hf.save_pretrained(folder)
        write_json(folder / "added_tokens.json",
                   {"base_vocab_size": base_size, "vocab_size": len(proto.pieces), "tokens": tokens})
    return final


def _make_model(folder: Path, rows: int, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir, sample_data) -> tuple[Path, dict, Path]:
    """Export a model whose vocabulary Megatron-style padding grew to 1024 rows (TP=8) for the 512 pieces."""
    root = tmp_path_factory.mktemp("export")
    source = _make_model(root / "dapt_model", rows=1024)
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


def test_chat_template_renders_llama2_turns(exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported[0])
    assert tokenizer.chat_template == LLAMA2_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is a latch?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s>"
                        "<s>[INST] What is a latch? [/INST]")
    ids = tokenizer.apply_chat_template(messages[1:2], tokenize=True)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_verify_catches_an_hf_tokenizer_that_disagrees_with_sentencepiece(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported[0], broken)
    # the transformers 4.57 conversion pitfall: without add_prefix_space the fast tokenizer prepends no "▁",
    # unlike SentencePiece's dummy prefix (with add_prefix_space set, transformers rebuilds tokenizer.json)
    tokenizer_json = json.loads((broken / "tokenizer.json").read_text())
    if tokenizer_json["pre_tokenizer"]:  # transformers >= 4.41: a Metaspace pre-tokenizer adds the "▁"
        tokenizer_json["pre_tokenizer"]["prepend_scheme"] = "never"
    else:  # transformers 4.40 (NeMo 24.07): a Prepend normalizer adds it
        normalizers = tokenizer_json["normalizer"]["normalizers"]
        tokenizer_json["normalizer"]["normalizers"] = [n for n in normalizers if n["type"] != "Prepend"]
    (broken / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    tokenizer_config = json.loads((broken / "tokenizer_config.json").read_text())
    del tokenizer_config["add_prefix_space"]
    (broken / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
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
    source = _make_model(tmp_path / "model", rows=rows)
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
    with pytest.raises(ExportError, match="trained with another tokenizer"):
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


def test_nemo_source_says_plainly_that_nemo_is_needed(tmp_path, tokenizer_dir, sample_data, exported):
    import importlib.util

    if importlib.util.find_spec("nemo") is not None:
        pytest.skip("NeMo is installed here; this test covers machines without it")
    checkpoint = tmp_path / "dapt.nemo"
    checkpoint.write_bytes(b"not a real checkpoint")
    config = ExportConfig(source=checkpoint, tokenizer=tokenizer_dir, output=tmp_path / "export",
                          base_hf_model=exported[2], heldout=sample_data[1], nemo_root=tmp_path / "NeMo")
    with pytest.raises(ExportError, match="needs NeMo, which this machine does not have") as caught:
        export(config)
    assert "convert_llama_nemo_to_hf.py --input_name_or_path" in str(caught.value)


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_smoke_test_reports_an_unreachable_endpoint(capsys):
    status = main(["smoke-test", "--base-url", f"http://127.0.0.1:{_free_port()}/v1", "--model", "m",
                   "--timeout-s", "5"])
    assert status == 2 and "cannot reach" in capsys.readouterr().err


def _wait_until_healthy(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the server did not answer within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def served_export(exported, tmp_path):
    """`transformers serve` on the exported folder, on loopback only; stopped after the test."""
    serving = pytest.importorskip("transformers.commands.serving")
    if not hasattr(serving, "serve_dependencies_available"):  # transformers 4.40 (NeMo 24.07): old `serve`
        pytest.skip("this transformers has no OpenAI-compatible `transformers serve` (added after 4.40)")
    if not serving.serve_dependencies_available:
        pytest.skip("`transformers serve` needs fastapi, uvicorn, pydantic and openai (pip install them)")
    port, log = _free_port(), tmp_path / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "transformers.commands.transformers_cli", "serve",
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
               "--force_model", str(exported[0])]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_healthy(process, port, log)
        yield f"http://127.0.0.1:{port}/v1", exported[0]
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def test_smoke_test_against_a_local_openai_compatible_server(served_export, tmp_path, capsys):
    base_url, folder = served_export
    common = ["smoke-test", "--base-url", base_url, "--model", str(folder), "--tokenizer", str(folder),
              "--max-tokens", "8", "--timeout-s", "60"]
    # transformers serve (4.57) offers /v1/chat/completions only, and always streams
    status = main([*common, "--requests", "chat", "--stream", "--output", str(tmp_path / "smoke")])
    assert status == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "smoke" / "smoke_test.json").read_text())
    chat = report["checks"]["chat"]
    assert report["passed"] and chat["streamed_chunks"] >= 2 and chat["text"]
    assert chat["round_trip"]["passed"] and report["checks"]["prompt_round_trip"]["passed"]
    capsys.readouterr()
    # it has no /v1/completions: the smoke test must fail on that, clearly and with a non-zero exit
    status = main(common)
    error = capsys.readouterr().err
    assert status == 2 and "completions answered HTTP 404" in error


def test_export_of_a_model_with_tied_embeddings(tmp_path, tokenizer_dir, sample_data):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    report = export(ExportConfig(source=tmp_path / "tied", tokenizer=tokenizer_dir,
                                 output=tmp_path / "export", heldout=sample_data[1], heldout_docs=4,
                                 heldout_chars=500))
    assert report["passed"] and report["source"]["padding_rows_stripped"] == 0
    assert report["checks"]["vocab_size"]["sizes"] == {
        "config.vocab_size": VOCAB, "sentencepiece": VOCAB, "hf_tokenizer": VOCAB,
        "model.embed_tokens.weight": VOCAB}
