"""Evaluation: bits per byte (windowing, batching, exact values), the stage's outputs and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from dapt import cli
from dapt.artifacts import read_manifest
from dapt.config import CODE_DIR
from dapt.evaluate import (
    EvaluateConfig,
    EvaluateInputError,
    _windows,
    bits_per_byte,
    evaluate,
    load_model_and_tokenizer,
    score_texts,
)

HELDOUT = CODE_DIR / "heldout"


def _texts(kind: str, limit: int) -> list[str]:
    path = HELDOUT / kind / f"{kind}_heldout.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent; run `python -m dapt sample-data`")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[:limit] if line.strip()]


def _model_folder(folder: Path, vocab_size: int, seed: int, max_positions: int = 64) -> Path:
    """A tiny random Llama with its own SentencePiece tokenizer.model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_texts("general", 40) + _texts("domain", 40)),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=0.98,
        remove_extra_whitespaces=False, minloglevel=2,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    return {"a": _model_folder(root / "a", 384, seed=0), "b": _model_folder(root / "b", 448, seed=1),
            "root": root}


def test_windows_score_every_token_once() -> None:
    ids = list(range(40))
    windows = _windows(ids, 16)
    assert all(2 <= len(w) <= 16 for w in windows)
    targets = [t for w in windows for t in w[1:]]
    assert targets == ids[1:]
    assert all(windows[i + 1][0] == windows[i][-1] for i in range(len(windows) - 1))
    assert _windows([5, 6], 16) == [[5, 6]]


def _reference_nll_bits(model, sp, text: str, max_length: int) -> float:
    """One window at a time, no batching or padding: the definition, written out."""
    ids = [sp.bos_id()] + sp.encode(text)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, max_length - 1):
            window = torch.tensor([ids[start:start + max_length]])
            logp = torch.log_softmax(model(input_ids=window).logits[0, :-1].double(), dim=-1)
            total -= float(logp.gather(1, window[0, 1:, None]).sum())
    return total / math.log(2)


def test_batched_scores_equal_the_definition(models) -> None:
    model, sp = load_model_and_tokenizer(models["a"])
    texts = [t[:4000] for t in _texts("domain", 5) + _texts("general", 3)]
    score = score_texts(model, sp, texts, max_length=64, batch_size=3)
    expected = sum(_reference_nll_bits(model, sp, t, 64) for t in texts)
    assert score.nll_bits == pytest.approx(expected, rel=1e-5)
    assert score.num_bytes == sum(len(t.encode("utf-8")) for t in texts)
    assert score.num_tokens == sum(len(sp.encode(t)) for t in texts)
    expected_bpb = expected / score.num_bytes
    assert bits_per_byte(model, sp, texts, max_length=64) == pytest.approx(expected_bpb, rel=1e-5)


def test_a_uniform_model_scores_log2_vocab_per_token(models) -> None:
    model, sp = load_model_and_tokenizer(models["a"])
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # tied: every logit becomes 0 -> uniform distribution
    texts = _texts("general", 4)
    score = score_texts(model, sp, texts)
    assert score.bits_per_byte == pytest.approx(score.num_tokens * math.log2(384) / score.num_bytes, rel=1e-6)


def test_stage_writes_table_json_and_plot(models) -> None:
    out = models["root"] / "evaluation"
    evaluate(EvaluateConfig(models=(models["a"], models["b"]), labels=("first", "second"),
                            output=out, max_documents=3))
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["label"] for r in results] == ["first", "second"]
    for row in results:
        for name in ("domain", "general"):
            assert row[name]["num_documents"] == 3
            assert row[name]["bits_per_byte"] == pytest.approx(row[name]["nll_bits"] / row[name]["num_bytes"])
    # Each model is scored with its own tokenizer: same bytes, different token counts.
    assert results[0]["domain"]["num_bytes"] == results[1]["domain"]["num_bytes"]
    assert results[0]["domain"]["num_tokens"] != results[1]["domain"]["num_tokens"]
    table = (out / "results.md").read_text()
    assert table.count("\n") == 4 and "| first |" in table
    assert (out / "bits_per_byte.png").stat().st_size > 1000
    assert read_manifest(out)["stage"] == "evaluate"


def test_bad_model_folders_are_refused(models, tmp_path) -> None:
    with pytest.raises(EvaluateInputError, match="does not exist"):
        evaluate(EvaluateConfig(models=(tmp_path / "nothing",), output=tmp_path / "out"))
    with pytest.raises(EvaluateInputError, match="one each"):
        evaluate(EvaluateConfig(models=(models["a"], models["b"]), labels=("x",), output=tmp_path / "out"))
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_bytes((models["a"] / "config.json").read_bytes())
    with pytest.raises(EvaluateInputError, match="no tokenizer.model"):
        load_model_and_tokenizer(no_tokenizer)
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    for name in ("config.json", "model.safetensors"):
        (mismatched / name).write_bytes((models["a"] / name).read_bytes())
    (mismatched / "tokenizer.model").write_bytes((models["b"] / "tokenizer.model").read_bytes())
    with pytest.raises(EvaluateInputError, match="embedding rows"):
        load_model_and_tokenizer(mismatched)


def test_cli_error_exits_with_status_2(models, tmp_path, capsys) -> None:
    status = cli.main(["evaluate", "--models", str(models["a"]), "--labels", "x", "y",
                       "--output", str(tmp_path / "out")])
    assert status == 2
    assert "one each" in capsys.readouterr().err


def test_converted_stories260k_knows_english_not_verilog(stories260k, shared_data, tmp_path) -> None:
    from dapt.basemodel import BaseModelConfig, build_base_model

    folder = build_base_model(BaseModelConfig(output=tmp_path / "stories", threads=2,
                                              llama2c_checkpoint=stories260k / "stories260K.bin",
                                              llama2c_tokenizer=stories260k / "tok512.model"))
    model, sp = load_model_and_tokenizer(Path(folder))
    scores = {}
    for kind in ("general", "domain"):
        lines = (shared_data / "heldout" / f"{kind}_heldout.jsonl").read_text(encoding="utf-8").splitlines()
        scores[kind] = score_texts(model, sp, [json.loads(line)["text"][:3000] for line in lines[:4]])
    uniform = {k: s.num_tokens * 9 / s.num_bytes for k, s in scores.items()}  # log2(512) = 9 bits per token
    # A TinyStories model: clearly better than uniform on English (3.95 bits/byte on the whole set),
    # worse than uniform on chip-design code (9.29 on the whole set).
    assert scores["general"].bits_per_byte < 0.8 * uniform["general"]
    assert scores["domain"].bits_per_byte > uniform["domain"]
    assert scores["domain"].bits_per_byte > scores["general"].bits_per_byte + 2
