"""CPU training: Megatron-style sampling, the blend, validation of bad input, training, resume."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from dapt import cli
from dapt.artifacts import file_sha256, read_manifest
from dapt.config import CODE_DIR, get_profile
from dapt.cpu_train import (
    TrainConfig,
    TrainInputError,
    WindowStream,
    blend_order,
    resolve_hyperparameters,
    train,
)
from dapt.errors import UserInputError

HELDOUT = CODE_DIR / "heldout"


def _texts(kind: str) -> list[str]:
    path = HELDOUT / kind / f"{kind}_heldout.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent; run `python -m dapt sample-data`")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def _write_dataset(
    prefix: Path, documents: list[list[int]], tokenizer: Path, vocab_size: int, eod: int
) -> None:
    """Write PREFIX_{train,validation}_text_document.bin/.idx and PREFIX.dapt.json like the data stage."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix.parent.mkdir(parents=True, exist_ok=True)
    splits = {"train": documents[2:], "validation": documents[:2]}
    for split, docs in splits.items():
        path = f"{prefix}_{split}_text_document"
        builder = IndexedDatasetBuilder(f"{path}.bin", dtype=np.int32)
        for doc in docs:
            builder.add_item(torch.tensor(doc + [eod], dtype=torch.int64))
            builder.end_document()
        builder.finalize(f"{path}.idx")
    sidecar = {"tokenizer_sha256": file_sha256(tokenizer), "vocab_size": vocab_size, "eod_id": eod,
               "splits": {k: {"documents": len(v)} for k, v in splits.items()}}
    Path(f"{prefix}.dapt.json").write_text(json.dumps(sidecar), encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small SentencePiece model, a tiny random Llama using it, and domain + general datasets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cpu_train")
    model_dir = root / "model"
    model_dir.mkdir()
    general, domain = _texts("general"), _texts("domain")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(general[:40] + domain[:40]), model_prefix=str(model_dir / "tokenizer"),
        vocab_size=384, model_type="bpe", byte_fallback=True, character_coverage=0.98,
        remove_extra_whitespaces=False, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id())
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    data = root / "data"
    for name, texts in (("domain", domain[:30]), ("general", general[:30])):
        docs = [sp.encode(t[:2000]) for t in texts]
        _write_dataset(data / name, docs, model_dir / "tokenizer.model", sp.get_piece_size(), sp.eos_id())
    return {"root": root, "model": model_dir, "domain": data / "domain", "general": data / "general"}


def _config(setup: dict[str, Path], output: str, **overrides) -> TrainConfig:
    values = dict(model=setup["model"], data_prefix=setup["domain"], general_prefix=setup["general"],
                  output=setup["root"] / output, general_share=0.25, seq_length=32, micro_batch_size=2,
                  global_batch_size=4, learning_rate=1e-2, warmup_steps=2, max_steps=8, save_interval=3,
                  log_interval=1, validation_windows=4, threads=1)
    values.update(overrides)
    return TrainConfig(**values)


class ListDataset:
    """The two IndexedDataset members WindowStream uses, over Python lists."""

    def __init__(self, docs: list[list[int]]) -> None:
        self.docs = docs
        self.sequence_lengths = np.array([len(d) for d in docs])

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        doc = self.docs[idx]
        return np.array(doc[offset: len(doc) if length is None else offset + length])


def test_windows_cover_each_epoch_once_with_one_token_overlap() -> None:
    docs = [[d * 100 + i for i in range(n)] for d, n in enumerate([7, 3, 11, 5, 9])]  # 35 distinct tokens
    stream = WindowStream(ListDataset(docs), seq_length=5, seed=3)
    windows = [stream.window(i) for i in range(stream.windows_per_block)]
    assert all(len(w) == 6 for w in windows)
    # Every window is a contiguous piece of the first epoch's stream, whole documents in a shuffled order.
    epoch0 = stream.tokens(0, 35)
    assert sorted(epoch0.tolist()) == sorted(t for d in docs for t in d)
    starts = sorted(int(np.flatnonzero(epoch0 == w[0])[0]) for w in windows)
    assert starts == list(range(0, 35, 5))[: len(windows)]
    # Deterministic for a seed, different for another.
    again = WindowStream(ListDataset(docs), seq_length=5, seed=3)
    assert all(np.array_equal(again.window(i), windows[i]) for i in range(len(windows)))
    other = WindowStream(ListDataset(docs), seq_length=5, seed=4)
    assert not np.array_equal(other.tokens(0, 35), epoch0)
    # The stream runs on into later epochs.
    assert len(stream.window(3 * stream.windows_per_block + 1)) == 6


def test_blend_keeps_exact_shares() -> None:
    order = blend_order([0.9, 0.1])
    picks = [next(order) for _ in range(1000)]
    general = [p for p in picks if p[0] == 1]
    assert len(general) == 100
    assert [p[1] for p in general] == list(range(100))  # samples of each dataset are taken in order
    for n in (10, 55, 333):
        assert abs(sum(1 for d, _ in picks[:n] if d == 1) - 0.1 * n) <= 1


@pytest.mark.parametrize(("overrides", "message"), [
    ({"global_batch_size": 6, "micro_batch_size": 4}, "not a multiple"),
    ({"warmup_steps": 8, "max_steps": 8}, "below --max-steps"),
    ({"general_share": 1.0}, "general-share"),
    ({"micro_batch_size": 0}, "at least 1"),
])
def test_impossible_hyperparameters_are_refused(setup, overrides, message) -> None:
    with pytest.raises(TrainInputError, match=message):
        resolve_hyperparameters(_config(setup, "unused", **overrides))


def test_profile_fills_unset_hyperparameters(setup) -> None:
    tiny = get_profile("tiny")
    hp = resolve_hyperparameters(TrainConfig(profile="tiny"))
    assert (hp.seq_length, hp.micro_batch_size) == (tiny.seq_length, tiny.micro_batch_size)
    assert hp.max_steps == tiny.max_steps
    assert (hp.adam_beta2, hp.weight_decay) == (0.95, 0.01)
    assert resolve_hyperparameters(_config(setup, "x")).gradient_accumulation_steps == 2


def test_data_from_another_tokenizer_is_refused(setup, tmp_path) -> None:
    meta = json.loads(Path(f"{setup['domain']}.dapt.json").read_text())
    prefix = tmp_path / "other"
    for split in ("train", "validation"):
        for suffix in (".bin", ".idx"):
            name = f"_{split}_text_document{suffix}"
            Path(f"{prefix}{name}").write_bytes(Path(f"{setup['domain']}{name}").read_bytes())
    Path(f"{prefix}.dapt.json").write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))
    with pytest.raises(TrainInputError, match="another tokenizer"):
        train(_config(setup, "refused", data_prefix=prefix))
    assert not (setup["root"] / "refused").exists()


def test_vocabulary_larger_than_the_model_is_refused(setup, tmp_path) -> None:
    prefix = tmp_path / "big"
    meta = json.loads(Path(f"{setup['domain']}.dapt.json").read_text())
    for split in ("train", "validation"):
        for suffix in (".bin", ".idx"):
            name = f"_{split}_text_document{suffix}"
            Path(f"{prefix}{name}").write_bytes(Path(f"{setup['domain']}{name}").read_bytes())
    Path(f"{prefix}.dapt.json").write_text(json.dumps({**meta, "vocab_size": 10_000}))
    with pytest.raises(TrainInputError, match="embedding rows"):
        train(_config(setup, "refused", data_prefix=prefix, general_share=0.0))


def test_missing_data_sidecar_is_refused(setup, tmp_path) -> None:
    with pytest.raises(UserInputError, match=r"nothing\.dapt\.json does not exist"):
        train(_config(setup, "refused", data_prefix=tmp_path / "nothing"))


def test_cli_reports_impossible_batch_with_status_2(setup, capsys) -> None:
    status = cli.main(["train", "--model", str(setup["model"]), "--data-prefix", str(setup["domain"]),
                       "--global-batch-size", "3", "--micro-batch-size", "2"])
    assert status == 2
    assert "not a multiple" in capsys.readouterr().err


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_training_writes_a_checkpoint_that_learns(setup) -> None:
    from transformers import AutoModelForCausalLM

    output = train(_config(setup, "trained", max_steps=12))
    report = json.loads((output / "train_report.json").read_text())
    losses = [e["loss"] for e in report["log_history"] if "loss" in e]
    assert report["steps"] == 12 and report["stopped_by"] == "max_steps"
    assert report["tokens_seen"] == 12 * 4 * 32
    assert losses[-1] < losses[0] - 0.3
    assert set(report["validation_loss_nats"]) == {"domain", "general"}
    assert (output / "tokenizer.model").read_bytes() == (setup["model"] / "tokenizer.model").read_bytes()
    assert (output / "loss_curve.png").stat().st_size > 1000
    manifest = read_manifest(output)
    assert manifest["stage"] == "train" and manifest["parameters"]["resolved"]["global_batch_size"] == 4
    model = AutoModelForCausalLM.from_pretrained(str(output))
    assert model.get_input_embeddings().num_embeddings == 384
    assert (setup["root"] / "trained_checkpoints" / "checkpoint-12").is_dir()


def test_resume_after_interruption_gives_the_uninterrupted_result(setup) -> None:
    straight = train(_config(setup, "straight", max_steps=6, seed=7))
    # An "interrupted" run: it stops after 3 steps (a checkpoint is saved every 3), then is run again.
    interrupted = _config(setup, "resumed", max_steps=3, seed=7,
                          checkpoint_dir=setup["root"] / "resumed_ckpt")
    train(interrupted)
    resumed = train(_config(setup, "resumed", max_steps=6, seed=7,
                            checkpoint_dir=setup["root"] / "resumed_ckpt"))
    report = json.loads((resumed / "train_report.json").read_text())
    assert report["resumed_from"].endswith("checkpoint-3") and report["steps_this_session"] == 3
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_changed_hyperparameters_restart_with_a_one_line_reason(setup, capsys) -> None:
    ckpt = setup["root"] / "conflict_ckpt"
    train(_config(setup, "conflict", max_steps=3, checkpoint_dir=ckpt))
    capsys.readouterr()
    fresh = train(_config(setup, "conflict", max_steps=3, learning_rate=5e-3, checkpoint_dir=ckpt))
    lines = [line for line in capsys.readouterr().out.splitlines() if "changed since" in line]
    assert lines == [f"--learning-rate changed since the checkpoints were written: training afresh from "
                     f"{setup['model']}; the stale conflict/ was removed"]
    report = json.loads((fresh / "train_report.json").read_text())
    assert report["resumed_from"] is None and report["steps_this_session"] == 3
    assert report["restarted_because"] == lines[0]
    assert read_manifest(fresh)["parameters"]["resolved"]["learning_rate"] == 5e-3


def test_refuse_mode_stops_and_changes_nothing(setup) -> None:
    ckpt = setup["root"] / "strict_ckpt"
    first = train(_config(setup, "strict", max_steps=3, checkpoint_dir=ckpt))
    before = {p: file_sha256(p) for p in sorted(ckpt.rglob("*")) if p.is_file()}
    weights = file_sha256(first / "model.safetensors")
    with pytest.raises(TrainInputError, match=r"other inputs: --learning-rate changed.*--on-changed-inputs restart"):
        train(_config(setup, "strict", max_steps=6, learning_rate=5e-3, checkpoint_dir=ckpt,
                      on_changed_inputs="refuse"))
    assert {p: file_sha256(p) for p in sorted(ckpt.rglob("*")) if p.is_file()} == before
    assert file_sha256(first / "model.safetensors") == weights
    # --no-resume still starts over on request.
    fresh = train(_config(setup, "strict", max_steps=3, learning_rate=5e-3, checkpoint_dir=ckpt,
                          resume=False, on_changed_inputs="refuse"))
    assert json.loads((fresh / "train_report.json").read_text())["resumed_from"] is None


def test_time_budget_stops_and_saves(setup) -> None:
    output = train(_config(setup, "budget", max_steps=10_000, time_budget_s=0.01, save_interval=1000))
    report = json.loads((output / "train_report.json").read_text())
    assert report["stopped_by"] == "time_budget" and 1 <= report["steps"] < 10_000
    assert (setup["root"] / "budget_checkpoints" / f"checkpoint-{report['steps']}").is_dir()


def test_changed_model_weights_restart_or_are_refused(setup, tmp_path, capsys) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(setup["model"], model)
    ckpt = tmp_path / "ckpt"
    train(_config(setup, "weights", model=model, max_steps=3, checkpoint_dir=ckpt))
    weights_file = next(model.glob("*.safetensors"))
    weights = load_file(weights_file)
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0  # the same folder, other weights (e.g. re-extended embeddings)
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(TrainInputError, match="the model weights changed"):
        train(_config(setup, "weights", model=model, max_steps=6, checkpoint_dir=ckpt, on_changed_inputs="refuse"))
    capsys.readouterr()
    output = train(_config(setup, "weights", model=model, max_steps=3, checkpoint_dir=ckpt))
    assert "the model weights changed since the checkpoints were written" in capsys.readouterr().out
    assert json.loads((output / "train_report.json").read_text())["steps_this_session"] == 3


def test_rerun_after_max_steps_gives_the_same_model(setup) -> None:
    first = train(_config(setup, "rerun", max_steps=3, seed=5))
    weights = _weights(first)
    again = train(_config(setup, "rerun", max_steps=3, seed=5))
    report = json.loads((again / "train_report.json").read_text())
    assert report["steps"] == 3 and report["steps_this_session"] == 0
    assert report["resumed_from"].endswith("checkpoint-3")
    for name, tensor in _weights(again).items():
        assert torch.equal(tensor, weights[name]), name


def _inputs_with_tokenizer(root: Path, vocab_size: int) -> dict[str, Path]:
    """A tokenizer of ``vocab_size`` pieces, a tiny Llama with that many rows, and data encoded with it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = root / "model"
    model_dir.mkdir(parents=True)
    general, domain = _texts("general"), _texts("domain")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(general[:40] + domain[:40]), model_prefix=str(model_dir / "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=0.98,
        remove_extra_whitespaces=False, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id())
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    for name, texts in (("domain", domain[:30]), ("general", general[:30])):
        docs = [sp.encode(t[:2000]) for t in texts]
        _write_dataset(root / "data" / name, docs, model_dir / "tokenizer.model", vocab_size, sp.eos_id())
    return {"model": model_dir, "domain": root / "data" / "domain", "general": root / "data" / "general"}


def test_tokenizer_a_then_b_then_a_retrains_each_time_and_ends_where_it_began(setup, tmp_path, capsys) -> None:
    """The user's loop (issue 11): notebook 1 rerun with another tokenizer size, then notebook 2, then back."""
    import shutil

    variants = {"A": {"model": setup["model"], "domain": setup["domain"], "general": setup["general"]},
                "B": _inputs_with_tokenizer(tmp_path / "b", 448)}
    live = tmp_path / "live"  # the folders the notebooks rewrite in place (extended_model, megatron_data)

    def install(variant: str) -> None:
        shutil.rmtree(live, ignore_errors=True)
        shutil.copytree(variants[variant]["model"], live / "model")
        for name in ("domain", "general"):
            for file in variants[variant][name].parent.glob(f"{name}*"):
                (live / "data").mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, live / "data" / file.name)

    config = _config({**setup, "model": live / "model", "domain": live / "data" / "domain",
                      "general": live / "data" / "general", "root": tmp_path}, "dapt_model", max_steps=4)
    results, reasons = [], []
    for variant in ("A", "B", "A"):
        install(variant)
        capsys.readouterr()
        output = train(config)
        reasons.append([line for line in capsys.readouterr().out.splitlines() if "changed since" in line])
        results.append({name: file_sha256(output / name) for name in ("model.safetensors", "tokenizer.model")})
        manifest = read_manifest(output)
        assert manifest["inputs"]["model"]["tokenizer_sha256"] == file_sha256(live / "model" / "tokenizer.model")
        assert results[-1]["tokenizer.model"] == file_sha256(variants[variant]["model"] / "tokenizer.model")
    assert reasons[0] == []
    for lines in reasons[1:]:
        assert len(lines) == 1
        assert lines[0] == ("the tokenizer (and the model weights, the model's config.json, the domain data, "
                            "the general data) changed since the checkpoints were written: training afresh "
                            f"from {live / 'model'}; the stale dapt_model/ was removed")
    assert results[2] == results[0] and results[1] != results[0]


class _PlantedCode:
    """Unpickling this object opens (creates) a file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def test_checkpoints_hold_no_pickles_and_a_planted_one_is_refused_unloaded(setup, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    train(_config(setup, "planted", max_steps=3, checkpoint_dir=ckpt))
    checkpoint = ckpt / "checkpoint-3"
    assert not [p.name for p in checkpoint.iterdir() if p.suffix in (".pt", ".pth", ".bin")]
    marker = tmp_path / "code_ran"
    torch.save({"python": _PlantedCode(marker), "numpy": None, "cpu": torch.zeros(1)}, checkpoint / "rng_state.pth")
    with pytest.raises(TrainInputError, match=r"did not write there: rng_state\.pth"):
        train(_config(setup, "planted", max_steps=6, checkpoint_dir=ckpt))
    assert not marker.exists()
    # The same for a checkpoint that would only be reused (it already reached max_steps).
    with pytest.raises(TrainInputError, match=r"rng_state\.pth"):
        train(_config(setup, "planted", max_steps=3, checkpoint_dir=ckpt))
    assert not marker.exists()


def test_tampered_or_unfinished_checkpoints_are_never_loaded(setup, tmp_path, capsys) -> None:
    import shutil

    ckpt = tmp_path / "ckpt"
    train(_config(setup, "partial", max_steps=3, checkpoint_dir=ckpt))
    # A save killed half-way: the folder exists but its record (written last) does not.
    shutil.copytree(ckpt / "checkpoint-3", ckpt / "checkpoint-5")
    (ckpt / "checkpoint-5" / "dapt_checkpoint.json").unlink()
    capsys.readouterr()
    resumed = train(_config(setup, "partial", max_steps=6, checkpoint_dir=ckpt))
    assert "checkpoint-5: its save did not finish" in capsys.readouterr().out
    assert json.loads((resumed / "train_report.json").read_text())["resumed_from"].endswith("checkpoint-3")
    # A recorded file whose bytes changed afterwards.
    state = ckpt / "checkpoint-6" / "training_state.json"
    state.write_text(state.read_text().replace("0.9", "0.8", 1))
    with pytest.raises(TrainInputError, match="training_state.json changed after the checkpoint was written"):
        train(_config(setup, "partial", max_steps=9, checkpoint_dir=ckpt))


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--max-steps", "0", "--max-steps must be at least 1 (got 0)"),
    ("--micro-batch-size", "0", "--micro-batch-size must be at least 1 (got 0)"),
    ("--global-batch-size", "0", "--global-batch-size must be at least 1 (got 0)"),
    ("--seq-length", "0", "--seq-length must be at least 1 (got 0)"),
    ("--threads", "0", "--threads must be at least 1 (got 0)"),
    ("--save-interval", "0", "--save-interval must be at least 1 (got 0)"),
    ("--log-interval", "0", "--log-interval must be at least 1 (got 0)"),
    ("--validation-windows", "-1", "--validation-windows must be at least 0 (got -1)"),
    ("--seed", "-3", "--seed must be at least 0 (got -3)"),
    ("--time-budget-s", "0", "--time-budget-s must be positive, or left unset (got 0.0)"),
    ("--learning-rate", "0", "--learning-rate must be positive (got 0.0)"),
    ("--learning-rate", "nan", "--learning-rate must be positive (got nan)"),
    ("--weight-decay", "-0.1", "--weight-decay must be at least 0 (got -0.1)"),
    ("--max-grad-norm", "-1", "--max-grad-norm must be at least 0"),
    ("--warmup-steps", "-1", "--warmup-steps -1 must be >= 0"),
])
def test_numbers_that_cannot_work_are_refused_with_the_value(setup, option, value, message, capsys) -> None:
    status = cli.main(["train", "--model", str(setup["model"]), "--data-prefix", str(setup["domain"]),
                       "--output", str(setup["root"] / "never"), option, value])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (setup["root"] / "never").exists()
