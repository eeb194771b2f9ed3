"""Evaluation: bits per byte (windowing, batching, exact values), the stage's outputs and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_model_fixture import build_tiny_model

from dapt import cli
from dapt.artifacts import file_sha256, read_manifest
from dapt.config import CODE_DIR
from dapt.evaluate import (
    EvaluateConfig,
    EvaluateInputError,
    _windows,
    batches,
    bits_per_byte,
    choose_placement,
    evaluate,
    load_model,
    load_model_and_tokenizer,
    score_texts,
    select_placement,
)

HELDOUT = CODE_DIR / "heldout"


def _texts(kind: str, limit: int) -> list[str]:
    path = HELDOUT / kind / f"{kind}_heldout.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent; run `python -m dapt sample-data`")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[:limit] if line.strip()]


def _model_folder(folder: Path, vocab_size: int, seed: int, max_positions: int = 64) -> Path:
    """A tiny random Llama with its own SentencePiece tokenizer.model and the HF tokenizer files for it."""
    return build_tiny_model(folder, _texts("general", 40) + _texts("domain", 40), vocab_size, seed, max_positions)


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
                            output=out, max_documents=3, lm_eval_tasks=("none",)))
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["label"] for r in results] == ["first", "second"]
    for row in results:
        for name in ("domain", "general"):
            assert row[name]["num_documents"] == 3
            assert row[name]["bits_per_byte"] == pytest.approx(row[name]["nll_bits"] / row[name]["num_bytes"])
            assert row[name]["tokens_per_second"] == pytest.approx(row[name]["num_tokens"] / row[name]["seconds"])
        assert row["tokenizer_sha256"] == file_sha256(Path(row["path"]) / "tokenizer.model")
    placement = json.loads((out / "results.json").read_text())["placement"]
    assert [(p["device"], p["dtype"], p["device_map"]) for p in placement] == [("cpu", "float32", None)] * 2
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


def _previous_release_nll_bits(model, sp, texts: list[str], max_length: int, batch_size: int = 8) -> float:
    """Scoring exactly as the CPU path did before device selection and token batching (kept to pin it)."""
    windows = []
    for text in texts:
        ids = [sp.bos_id()] + sp.encode(text)
        windows.extend(_windows(ids, max_length))
    windows.sort(key=len, reverse=True)
    total_nats = 0.0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            tokens = torch.zeros((len(batch), len(batch[0])), dtype=torch.long)
            scored = torch.zeros((len(batch), len(batch[0]) - 1), dtype=torch.bool)
            for row, window in enumerate(batch):
                tokens[row, :len(window)] = torch.tensor(window)
                scored[row, :len(window) - 1] = True
            logits = model(input_ids=tokens).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
            ).reshape(scored.shape)
            total_nats += float(nll[scored].double().sum())
    return total_nats / math.log(2)


def test_cpu_scores_are_the_previous_ones_bit_for_bit(models) -> None:
    model, sp = load_model_and_tokenizer(models["b"])
    assert next(model.parameters()).dtype == torch.float32
    texts = [t[:3000] for t in _texts("domain", 6) + _texts("general", 5)]
    assert score_texts(model, sp, texts, max_length=64).nll_bits == _previous_release_nll_bits(model, sp, texts, 64)


def test_batches_are_bounded_by_rows_and_padded_tokens() -> None:
    windows = [[0] * n for n in (16, 16, 12, 9, 9, 5, 3, 2)]
    assert [len(b) for b in batches(windows, 3, None)] == [3, 3, 2]
    by_tokens = list(batches(windows, None, 40))
    assert [len(b) for b in by_tokens] == [2, 3, 3]
    assert all(len(b) * len(b[0]) <= 40 for b in by_tokens)
    assert [len(b) for b in batches([[0] * 50, [0] * 4], None, 40)] == [1, 1]  # a long window goes alone
    assert sum(len(b) for b in batches(windows, 2, 20)) == len(windows)


def test_token_batches_give_the_same_scores(models) -> None:
    model, sp = load_model_and_tokenizer(models["a"])
    texts = [t[:3000] for t in _texts("domain", 4)]
    rows = score_texts(model, sp, texts, max_length=64)
    tokens = score_texts(model, sp, texts, max_length=64, batch_size=None, batch_tokens=150)
    assert tokens.nll_bits == pytest.approx(rows.nll_bits, rel=1e-6)
    assert tokens.seconds > 0 and tokens.tokens_per_second == pytest.approx(tokens.num_tokens / tokens.seconds)


def test_placement_on_a_cpu_machine_and_on_gpus() -> None:
    cpu = choose_placement("auto", "auto", cuda_gpus=0, bf16_supported=False)
    assert (cpu.device, cpu.dtype, cpu.device_map) == ("cpu", "float32", None)
    gib = 1 << 30
    fits = choose_placement("auto", "auto", cuda_gpus=2, bf16_supported=True, model_bytes=14 * gib,
                            gpu_free_bytes=[79 * gib, 79 * gib])
    assert (fits.device, fits.dtype, fits.device_map) == ("cuda", "bfloat16", None)
    split = choose_placement("auto", "auto", cuda_gpus=4, bf16_supported=True, model_bytes=140 * gib,
                             gpu_free_bytes=[79 * gib] * 4)
    assert (split.device, split.dtype, split.device_map) == ("cuda", "bfloat16", "auto")
    assert "split over 4 GPUs" in split.reason
    old_gpu = choose_placement("auto", "auto", cuda_gpus=1, bf16_supported=False, model_bytes=14 * gib,
                               gpu_free_bytes=[31 * gib])
    assert (old_gpu.dtype, old_gpu.device_map) == ("float16", None)
    forced = choose_placement("cpu", "auto", cuda_gpus=8, bf16_supported=True)
    assert (forced.device, forced.dtype) == ("cpu", "float32")
    assert choose_placement("cuda", "float32", cuda_gpus=1, bf16_supported=True).dtype == "float32"
    with pytest.raises(EvaluateInputError, match="no CUDA GPU is visible"):
        choose_placement("cuda", "auto", cuda_gpus=0, bf16_supported=False)
    with pytest.raises(EvaluateInputError, match="does not support bf16"):
        choose_placement("cuda", "bfloat16", cuda_gpus=1, bf16_supported=False)


def test_select_placement_reads_the_gpus_and_the_model_size(models, monkeypatch) -> None:
    """Both branches of the machine-facing selection, with the CUDA facts forced."""
    assert select_placement("auto", "auto", models["a"]).device == "cpu"  # this machine: no GPU
    free = {"bytes": 80 << 30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    roomy = select_placement("auto", "auto", models["a"])
    assert (roomy.device, roomy.dtype, roomy.device_map, roomy.gpus) == ("cuda", "bfloat16", None, 2)
    weights = sum(p.numel() for p in load_model_and_tokenizer(models["a"])[0].parameters()) * 2  # bf16 bytes
    reserve = (1 << 30) + 1000 * 384 * 10
    free["bytes"] = weights + reserve - 1  # one byte short of the weights and one batch's logits
    tight = select_placement("auto", "auto", models["a"], batch_tokens=1000, vocab_size=384)
    assert (tight.device, tight.device_map) == ("cuda", "auto")
    free["bytes"] = weights + reserve
    assert select_placement("auto", "auto", models["a"], batch_tokens=1000, vocab_size=384).device_map is None
    assert select_placement("cpu", "auto", models["a"]).device == "cpu"


def test_bf16_placement_scores_close_to_float32(models) -> None:
    texts = [t[:2000] for t in _texts("general", 3)]
    model32, sp = load_model_and_tokenizer(models["a"])
    bf16 = choose_placement("cpu", "bfloat16", cuda_gpus=0, bf16_supported=False)
    model16 = load_model(models["a"], bf16)
    assert next(model16.parameters()).dtype == torch.bfloat16
    a, b = score_texts(model32, sp, texts, max_length=64), score_texts(model16, sp, texts, max_length=64)
    assert a.nll_bits != b.nll_bits and b.bits_per_byte == pytest.approx(a.bits_per_byte, rel=0.02)


def test_the_table_is_written_once_and_not_printed(models, capsys) -> None:
    """Notebook 2 displays results.md; the stage prints one line per model, not the table again."""
    out = models["root"] / "evaluation_print"
    evaluate(EvaluateConfig(models=(models["a"],), labels=("only",), output=out, max_documents=2,
                            lm_eval_tasks=("none",)))
    printed = capsys.readouterr().out
    assert "| model |" not in printed and "domain tokens/byte" not in printed
    assert printed.count("only: domain ") == 1 and "tokens/s, cpu float32" in printed
    assert (out / "results.md").read_text().startswith("| model |")


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def _copy_model(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_a_folder_whose_tokenizer_is_not_what_it_claims_is_refused(models, tmp_path) -> None:
    folder = _copy_model(models["a"], tmp_path / "dapt_model")
    _write_manifest(folder, {"stage": "train", "inputs": {"model": {"tokenizer_sha256": "0" * 64}}})
    with pytest.raises(EvaluateInputError, match="mixes artifacts of two runs.*python -m dapt train"):
        evaluate(EvaluateConfig(models=(folder,), output=tmp_path / "out", lm_eval_tasks=("none",)))
    assert not (tmp_path / "out").exists()


def test_a_model_trained_from_an_evaluated_folder_that_changed_since_is_refused(models, tmp_path) -> None:
    extended = _copy_model(models["a"], tmp_path / "extended_model")
    trained = _copy_model(models["a"], tmp_path / "dapt_model")
    old_sha = file_sha256(trained / "tokenizer.model")
    _write_manifest(trained, {"stage": "train", "inputs": {"model": {"path": str(extended),
                                                                      "tokenizer_sha256": old_sha}}})
    config = EvaluateConfig(models=(extended, trained), labels=("extended", "after DAPT"), max_documents=1,
                            output=tmp_path / "out", lm_eval_tasks=("none",))
    evaluate(config)  # consistent: accepted
    # notebook 1 rerun with another tokenizer size rewrites extended_model; dapt_model is not retrained
    for name in ("tokenizer.model", "config.json", "model.safetensors"):
        (extended / name).write_bytes((models["b"] / name).read_bytes())
    with pytest.raises(EvaluateInputError, match=r"after DAPT .* from extended .*Rerun `python -m dapt train`"):
        evaluate(config)
    assert read_manifest(tmp_path / "out")["inputs"]["models"]["extended"]["tokenizer_sha256"] == old_sha


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--batch-size", "0", "--batch-size must be at least 1 (got 0)"),
    ("--batch-tokens", "1", "--batch-tokens must be at least 2 (got 1)"),
    ("--max-length", "0", "--max-length must be at least 2 (got 0)"),
    ("--max-documents", "-1", "--max-documents must be at least 1 (got -1)"),
    ("--max-documents", "0", "--max-documents must be at least 1 (got 0)"),
    ("--threads", "0", "--threads must be at least 1 (got 0)"),
    ("--lm-eval-limit", "0", "--lm-eval-limit must be at least 1 (got 0)"),
    ("--lm-eval-items", "0", "--lm-eval-items must be at least 1 (got 0)"),
    ("--lm-eval-batch-size", "0", "--lm-eval-batch-size must be at least 1 (got 0)"),
    ("--lm-eval-fewshot", "-1", "--lm-eval-fewshot must be at least 0 (got -1)"),
])
def test_numbers_that_cannot_work_are_refused(models, tmp_path, option, value, message, capsys) -> None:
    status = cli.main(["evaluate", "--models", str(models["a"]), "--output", str(tmp_path / "out"), option, value])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
