"""NeMo launch: checks before launch and the exact commands, on real data built with the Llama 2 tokenizer."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from dapt.config import get_profile
from dapt.errors import UserInputError
from dapt.megatron_data import DataConfig, build_megatron_data
from dapt.nemo_launch import (
    LLAMA2_ARCH,
    LaunchConfig,
    check_gpus,
    check_vocab,
    launch,
    parameter_count,
)


def _extended_tokenizer(base: Path, extra: int, folder: Path) -> Path:
    """Llama 2 + ``extra`` NORMAL pieces scored below every base piece (what the tokenizer stage appends)."""
    from dapt.compat import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(base.read_bytes())
    low = min(p.score for p in proto.pieces) - 1
    for i in range(extra):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"▁dom{i}", low - i, pb.ModelProto.SentencePiece.NORMAL
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    return folder


def _hf_folder(folder: Path, tokenizer_model: Path, vocab: int) -> Path:
    """config.json of Llama-2-7b-hf with ``vocab`` rows; weights reduced to the two vocab-sized tensors."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    config = {**LLAMA2_ARCH["7b"], "vocab_size": vocab, "rms_norm_eps": 1e-5, "initializer_range": 0.02,
              "rope_theta": 10000.0, "model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config))
    rows = np.zeros((vocab, 2), dtype=np.float16)
    save_file({"model.embed_tokens.weight": rows, "lm_head.weight": rows}, str(folder / "model.safetensors"))
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama2_tokenizer, shared_data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("launch")
    tok = root / "tokenizer"
    tok.mkdir()
    shutil.copy(llama2_tokenizer, tok / "tokenizer.model")
    for name in ("domain", "general"):
        build_megatron_data(DataConfig(tokenizer=tok, input=shared_data / "heldout" / f"{name}_heldout.jsonl",
                                       output_prefix=root / "data" / name, split_percent=(90.0, 5.0, 5.0),
                                       workers=2))
    return {"root": root, "tokenizer": tok, "hf": _hf_folder(root / "hf", tok / "tokenizer.model", 32000),
            "domain": root / "data" / "domain", "general": root / "data" / "general"}


def _config(setup: dict[str, Path], tmp_path: Path, **kwargs) -> LaunchConfig:
    values = {"profile": "llama2-7b", "hf_model": setup["hf"], "tokenizer": setup["tokenizer"],
              "domain_data": setup["domain"], "general_data": setup["general"], "output": tmp_path / "launch",
              "run_dir": tmp_path / "run", "max_steps": 100, "warmup_steps": 10, "val_check_interval": 50,
              "dry_run": True, **kwargs}
    return LaunchConfig(**values)


def _overrides(argv: list[str]) -> dict[str, str]:
    start = next(i for i, a in enumerate(argv) if a.startswith("--config-name=")) + 1
    return dict(arg.split("=", 1) for arg in argv[start:])


def test_dry_run_commands_hold_every_key(setup, tmp_path, capsys) -> None:
    plan = launch(_config(setup, tmp_path))
    printed = capsys.readouterr().out
    assert all(check.ok for check in plan["checks"])
    convert = plan["convert"]
    assert convert[1] == "/opt/NeMo/scripts/checkpoint_converters/convert_llama_hf_to_nemo.py"
    assert convert[convert.index("--input_name_or_path") + 1] == str(setup["hf"])
    assert convert[convert.index("--precision") + 1] == "bf16"
    run = plan["torchrun"]
    assert run[:4] == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    assert run[4].endswith("examples/nlp/language_modeling/megatron_gpt_pretraining.py")
    assert "--config-name=megatron_llama_config" in run
    o = _overrides(run)
    expected = {
        "trainer.devices": "2", "trainer.num_nodes": "1", "trainer.precision": "bf16-mixed",
        "trainer.max_steps": "100", "trainer.val_check_interval": "50",
        "model.tensor_model_parallel_size": "2", "model.pipeline_model_parallel_size": "1",
        "model.micro_batch_size": "1", "model.global_batch_size": "256", "model.encoder_seq_length": "4096",
        "model.num_layers": "32", "model.hidden_size": "4096", "model.ffn_hidden_size": "11008",
        "model.num_attention_heads": "32", "model.layernorm_epsilon": "1e-05",
        "model.make_vocab_size_divisible_by": "128", "model.tokenizer.library": "sentencepiece",
        "model.tokenizer.model": f'"{setup["tokenizer"] / "tokenizer.model"}"',
        "++model.restore_from_path": f'"{tmp_path / "run" / "extended_model.nemo"}"',
        "model.optim.lr": "5e-06", "model.optim.weight_decay": "0.01", "model.optim.betas": "[0.9,0.95]",
        "model.optim.sched.name": "CosineAnnealing", "model.optim.sched.warmup_steps": "10",
        "++model.optim.sched.constant_steps": "0", "model.optim.sched.min_lr": "5e-06",
        "exp_manager.explicit_log_dir": f'"{tmp_path / "run"}"', "exp_manager.resume_if_exists": "True",
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end": "True",
    }
    assert {key: o.get(key) for key in expected} == expected
    blend = o["++model.data.data_prefix"]
    assert blend.startswith("{train:[0.91,") and f'0.09,"{setup["general"]}_train_text_document"' in blend
    assert "validation:[" in blend and "test:[" in blend
    assert plan["nemo"]["trained"] == tmp_path / "run" / "checkpoints" / "dapt.nemo"
    assert shlex.join(run) in printed and "NCCL_NVLS_ENABLE=0" in printed
    folder = tmp_path / "launch"
    commands = (folder / "commands.sh").read_text()
    assert "export NCCL_NVLS_ENABLE=0" in commands and shlex.join(run) in commands
    saved = json.loads((folder / "launch_plan.json").read_text())
    assert saved["ready"] and saved["pretrain_torchrun"] == run
    assert json.loads((folder / "manifest.json").read_text())["stage"] == "launch"


def test_multinode_profile_writes_slurm_script(setup, tmp_path) -> None:
    plan = launch(_config(setup, tmp_path, profile="llama2-7b-multinode"))
    script = (tmp_path / "launch" / "dapt.sbatch").read_text()
    assert "#SBATCH --nodes=4" in script and "#SBATCH --ntasks-per-node=8" in script
    assert "export NCCL_NVLS_ENABLE=0" in script and "--container-image=nvcr.io/nvidia/nemo:24.07" in script
    assert f"python {shlex.join(plan['pretrain'])}" in script
    assert _overrides(plan["pretrain"])["trainer.num_nodes"] == "4"


def test_data_built_with_another_tokenizer_is_refused(setup, tmp_path) -> None:
    other = _extended_tokenizer(setup["tokenizer"] / "tokenizer.model", 256, tmp_path / "adapted")
    hf = _hf_folder(tmp_path / "hf", other / "tokenizer.model", 32256)
    with pytest.raises(UserInputError, match="domain data built with this tokenizer.*built with tokenizer"):
        launch(_config(setup, tmp_path, tokenizer=other, hf_model=hf))


def test_vocab_not_divisible_for_tp_and_checkpoint_rows(setup, tmp_path) -> None:
    assert check_vocab(32000, 2).ok and not check_vocab(32000, 8).ok and check_vocab(32768, 8).ok
    with pytest.raises(UserInputError, match="tokenizer vocab 32000 must be a multiple of 128 x TP 8"):
        launch(_config(setup, tmp_path, profile="llama2-70b"))
    hf = _hf_folder(tmp_path / "hf", setup["tokenizer"] / "tokenizer.model", 32128)
    with pytest.raises(UserInputError, match="tokenizer size = checkpoint vocab"):
        launch(_config(setup, tmp_path, hf_model=hf))


def test_impossible_batch_and_schedule_are_refused(setup, tmp_path) -> None:
    expected = "batch sizes: global batch 10 must be divisible by micro batch 1 x data parallel 4"
    with pytest.raises(UserInputError, match=expected):
        launch(_config(setup, tmp_path, profile="llama2-7b-8gpu", global_batch_size=10))
    with pytest.raises(UserInputError, match=r"(?s)warmup: warmup 100 steps.*validation interval"):
        launch(_config(setup, tmp_path, warmup_steps=100, val_check_interval=500))


def test_more_gpus_than_present_is_refused_and_nothing_pretends(setup, tmp_path, capsys) -> None:
    profile = get_profile("llama2-7b-8gpu")
    assert not check_gpus(profile, 2).ok and check_gpus(profile, 8).ok
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs; the refusal is checked on machines without them")
    with pytest.raises(UserInputError, match="not run:(?s:.*)needs 2 GPUs on this node, 0 visible"):
        launch(_config(setup, tmp_path, dry_run=False))
    assert "torchrun" in capsys.readouterr().out
    assert not (tmp_path / "run" / "extended_model.nemo").exists()


def test_llama2_parameter_counts() -> None:
    # published sizes of meta-llama/Llama-2-{7b,13b,70b}-hf
    assert parameter_count(LLAMA2_ARCH["7b"], 32000) == 6_738_415_616
    assert parameter_count(LLAMA2_ARCH["13b"], 32000) == 13_015_864_320
    assert parameter_count(LLAMA2_ARCH["70b"], 32000) == 68_976_648_192
