"""NeMo launch: checks before launch, the run folder, the commands and scripts, on real data (no NeMo needed).

The checks against NeMo's own code (composition, exp_manager, scheduler, tokenizer, datasets, converters) are in
``test_nemo_compose.py``, ``test_nemo_run_folder.py`` and ``test_nemo_data.py``.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from nemo_fixtures import (
    dry_run_config,
    extended_llama_tokenizer,
    llama2_setup,
    llama_hf_folder,
    overrides,
    sbatch_arguments,
    tiny_artifacts,
)

from dapt.config import get_profile
from dapt.errors import UserInputError
from dapt.nemo_launch import (
    LLAMA2_ARCH,
    LaunchConfig,
    build_plan,
    check_gpus,
    check_vocab,
    launch,
    parameter_count,
)
from dapt.nemo_launch.scripts import mount_folders
from dapt.nemo_launch.settings import max_time_per_run, resolve, slurm_time_seconds


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama2_tokenizer, shared_data) -> dict[str, Path]:
    return llama2_setup(tmp_path_factory.mktemp("launch"), llama2_tokenizer, shared_data)


def _config(setup: dict[str, Path], tmp_path: Path, **kwargs) -> LaunchConfig:
    return dry_run_config(setup, tmp_path, **kwargs)


def test_dry_run_commands_hold_every_key(setup, tmp_path, capsys) -> None:
    plan = launch(_config(setup, tmp_path))
    printed = capsys.readouterr().out
    assert plan.ready
    convert = plan.convert
    assert convert[1] == "/opt/NeMo/scripts/checkpoint_converters/convert_llama_hf_to_nemo.py"
    assert convert[convert.index("--input_name_or_path") + 1] == str(setup["hf"])
    assert convert[convert.index("--output_path") + 1] == str(tmp_path / "run" / ".converting" / "extended_model.nemo")
    assert convert[convert.index("--precision") + 1] == "bf16"
    run = plan.torchrun
    assert run[:4] == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    assert run[4].endswith("examples/nlp/language_modeling/megatron_gpt_pretraining.py")
    assert "--config-name=megatron_llama_config" in run
    o = overrides(run)
    expected = {
        "trainer.devices": "2", "trainer.num_nodes": "1", "trainer.precision": "bf16-mixed",
        "trainer.max_steps": "100", "trainer.val_check_interval": "50", "trainer.limit_val_batches": "5",
        "model.tensor_model_parallel_size": "2", "model.pipeline_model_parallel_size": "1",
        "model.sequence_parallel": "True", "model.megatron_amp_O2": "True",
        "model.micro_batch_size": "1", "model.global_batch_size": "256", "model.encoder_seq_length": "4096",
        "model.num_layers": "32", "model.hidden_size": "4096", "model.ffn_hidden_size": "11008",
        "model.num_attention_heads": "32", "model.layernorm_epsilon": "1e-05",
        "model.make_vocab_size_divisible_by": "128", "model.tokenizer.library": "sentencepiece",
        "model.tokenizer.model": f'"{setup["tokenizer"] / "tokenizer.model"}"',
        "++model.restore_from_path": f'"{tmp_path / "run" / "extended_model.nemo"}"',
        "model.data.index_mapping_dir": f'"{tmp_path / "run" / "index_mapping"}"',
        "model.optim.lr": "5e-06", "model.optim.weight_decay": "0.01", "model.optim.betas": "[0.9,0.95]",
        "model.optim.sched.name": "CosineAnnealing", "model.optim.sched.warmup_steps": "10",
        "model.optim.sched.constant_steps": "0", "model.optim.sched.min_lr": "5e-06",
        "exp_manager.explicit_log_dir": f'"{tmp_path / "run" / "training"}"', "exp_manager.name": '"dapt"',
        "exp_manager.resume_if_exists": "True", "exp_manager.checkpoint_callback_params.save_top_k": "1",
        "++exp_manager.checkpoint_callback_params.save_last": "True",
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end": "True",
    }
    assert {key: o.get(key) for key in expected} == expected
    assert "++exp_manager.max_time_per_run" not in o  # single node: no Slurm time limit in commands.sh
    blend = o["++model.data.data_prefix"]
    assert blend.startswith("{train:[0.91,") and f'0.09,"{setup["general"]}_train_text_document"' in blend
    assert "validation:[" in blend and "test:[" in blend
    assert plan.trained_nemo == tmp_path / "run" / "training" / "checkpoints" / "dapt.nemo"
    assert shlex.join(run) in printed and "NCCL_NVLS_ENABLE=0" in printed and plan.summary() in printed
    folder = tmp_path / "launch"
    commands = (folder / "commands.sh").read_text()
    assert "export NCCL_NVLS_ENABLE=0" in commands and shlex.join(run) in commands
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in commands  # TP 2: sequence parallelism
    saved = json.loads((folder / "launch_plan.json").read_text())
    assert saved["ready"] and saved["pretrain_torchrun"] == run
    assert saved["layout"]["log_dir"] == str(tmp_path / "run" / "training")
    assert json.loads((folder / "manifest.json").read_text())["stage"] == "launch"


def test_run_folder_keeps_what_the_commands_read_out_of_the_log_dir(setup, tmp_path) -> None:
    """Defect 1: exp_manager moves every file directly inside explicit_log_dir into run_N/ before the restore."""
    plan = build_plan(_config(setup, tmp_path, profile="llama2-7b-multinode"))
    log_dir = Path(json.loads(overrides(plan.pretrain)["exp_manager.explicit_log_dir"]))
    read_or_written = {
        "restore_from_path": Path(json.loads(overrides(plan.pretrain)["++model.restore_from_path"])),
        "conversion output": Path(plan.convert[plan.convert.index("--output_path") + 1]),
        "Slurm log": plan.layout.slurm_output,
        "index mapping": Path(json.loads(overrides(plan.pretrain)["model.data.index_mapping_dir"])),
    }
    loose = {name: path for name, path in read_or_written.items() if path.parent == log_dir}
    assert not loose, f"these sit directly in the log dir {log_dir}, where exp_manager moves them: {loose}"
    assert plan.trained_nemo.parent == log_dir / "checkpoints"  # where NeMoModelCheckpoint writes it


def test_multinode_profile_writes_slurm_script(setup, tmp_path) -> None:
    plan = launch(_config(setup, tmp_path, profile="llama2-7b-multinode"))
    script = (tmp_path / "launch" / "dapt.sbatch").read_text()
    assert "#SBATCH --nodes=4" in script and "#SBATCH --ntasks-per-node=8" in script
    assert "export NCCL_NVLS_ENABLE=0" in script and "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script
    assert "--container-image=nvcr.io/nvidia/nemo:24.07" in script
    assert f"python {shlex.join(plan.pretrain_slurm)}" in script
    slurm = overrides(plan.pretrain_slurm)
    assert slurm["trainer.num_nodes"] == "4" and slurm["++exp_manager.max_time_per_run"] == "00:03:45:00"


def test_sbatch_lines_are_read_back_as_written(setup, tmp_path) -> None:
    """Defect 3: ``#SBATCH --output`` was unquoted; Slurm splits at whitespace (and stops at '#')."""
    run_dir = tmp_path / "run dir #2 \"q\""
    plan = launch(_config(setup, tmp_path, profile="llama2-7b-multinode", run_dir=run_dir,
                          slurm_partition="batch gpu", slurm_account="acct#1", slurm_time="1-00:00"))
    arguments = sbatch_arguments((tmp_path / "launch" / "dapt.sbatch").read_text())
    assert f"--output={run_dir}/slurm/slurm-%j.out" in arguments
    assert "--partition=batch gpu" in arguments and "--account=acct#1" in arguments
    assert "--time=1-00:00" in arguments and "--job-name=dapt-llama2-7b-multinode" in arguments
    assert plan.layout.slurm_output == run_dir / "slurm" / "slurm-%j.out"


def test_container_mounts_each_input_folder_never_the_root(setup, tmp_path) -> None:
    """Defect 2: inputs on different trees gave --container-mounts=/:/, hiding the container's /opt/NeMo."""
    settings = resolve(LaunchConfig(profile="llama2-7b-multinode", hf_model=Path("/data/models/ext"),
                                    tokenizer=Path("/scratch/tok"), domain_data=Path("/lustre/d/domain"),
                                    general_data=Path("/lustre/g/general"), run_dir=Path("/scratch/run")))
    assert mount_folders(settings) == [Path("/data/models/ext"), Path("/lustre/d"), Path("/lustre/g"),
                                       Path("/scratch/run"), Path("/scratch/tok")]
    nested = resolve(_config(setup, tmp_path, run_dir=setup["root"] / "data" / "run"))
    assert mount_folders(nested) == [setup["root"] / name for name in ("data", "hf", "tokenizer")]  # run: in data
    plan = launch(_config(setup, tmp_path, profile="llama2-7b-multinode"))
    mounts = next(part for part in shlex.split((tmp_path / "launch" / "dapt.sbatch").read_text().splitlines()[-1])
                  if part.startswith("--container-mounts="))
    assert mounts.split("=", 1)[1].split(",") == [f"{f}:{f}" for f in mount_folders(plan.settings)]
    assert "/:/" not in mounts
    for bad in (tmp_path / "a:b", tmp_path / "a,b"):
        with pytest.raises(UserInputError, match=r"container mounts: .*holds ',' or ':'"):
            launch(_config(setup, tmp_path, profile="llama2-7b-multinode", run_dir=bad))
    with pytest.raises(UserInputError, match="would hide the container's /opt/NeMo"):
        launch(_config(setup, tmp_path, profile="llama2-7b-multinode", run_dir=Path("/opt")))
    assert launch(_config(setup, tmp_path, run_dir=tmp_path / "a:b", container_image="")).ready


def test_time_limit_gives_nemo_a_stop_before_it(setup, tmp_path) -> None:
    """Defect 5: exp_manager.max_time_per_run from the Slurm limit minus a margin, so NeMo saves before it."""
    assert [slurm_time_seconds(t) for t in ("90", "90:30", "04:00:00", "2-12", "1-02:03", "1-02:03:04")] == [
        5400, 5430, 14400, 216000, 93780, 93784]
    assert slurm_time_seconds("UNLIMITED") is None and max_time_per_run("UNLIMITED", 15) is None
    assert max_time_per_run("04:00:00", 15) == "00:03:45:00" and max_time_per_run("2-00:00:00", 30) == "01:23:30:00"
    for bad in ("4h", "04:00:00:00", "-1", "0"):
        with pytest.raises(UserInputError, match=f"--slurm-time '{bad}'"):
            slurm_time_seconds(bad)
    with pytest.raises(UserInputError, match="leaves 0 s of training per job"):
        launch(_config(setup, tmp_path, slurm_time="00:15:00"))
    plan = build_plan(_config(setup, tmp_path, slurm_time="1-00:00:00", slurm_time_margin_minutes=20))
    assert overrides(plan.pretrain_slurm)["++exp_manager.max_time_per_run"] == "00:23:40:00"


def test_checkpoints_kept_and_validation_batches_are_parameters(setup, tmp_path) -> None:
    """Defect 4 (save_top_k 10 inherited: about 1 TB per 7B run) and the validation size (50 x 256 sequences)."""
    o = overrides(build_plan(_config(setup, tmp_path, save_top_k=2, limit_val_batches=3)).pretrain)
    assert o["exp_manager.checkpoint_callback_params.save_top_k"] == "2" and o["trainer.limit_val_batches"] == "3"


@pytest.mark.parametrize(("option", "value"), [
    ("max_steps", 0), ("global_batch_size", 0), ("micro_batch_size", 0), ("val_check_interval", 0),
    ("warmup_steps", -1), ("limit_val_batches", 0), ("save_top_k", 0), ("slurm_time_margin_minutes", -5),
    ("general_share", 1.0), ("precision", "bf16"),
])
def test_numbers_that_cannot_work_are_refused_not_replaced(setup, tmp_path, option, value) -> None:
    """Issue 12 item 9: ``max_steps=0`` was silently replaced by the profile's 1000 (``or``)."""
    flag = "--" + option.replace("_", "-")
    with pytest.raises(UserInputError, match=f"^{flag} {value!r}: "):
        launch(_config(setup, tmp_path, **{option: value}))
    assert not (tmp_path / "launch").exists()


def test_dry_run_with_missing_inputs_writes_nothing(setup, tmp_path, capsys) -> None:
    missing = tmp_path / "no_such_model"
    expected = f"nothing written to {re.escape(str(tmp_path / 'launch'))}(?s:.*)--hf-model {re.escape(str(missing))}"
    with pytest.raises(UserInputError, match=expected):
        launch(_config(setup, tmp_path, hf_model=missing))
    assert not (tmp_path / "launch").exists() and not list(tmp_path.glob(".launch*"))
    assert "[FAILED] HF checkpoint present" in capsys.readouterr().out


def test_data_built_with_another_tokenizer_is_refused(setup, tmp_path) -> None:
    other = extended_llama_tokenizer(setup["tokenizer"] / "tokenizer.model", tmp_path / "adapted", 32256)
    hf = llama_hf_folder(tmp_path / "hf", "7b", other / "tokenizer.model", 32256)
    with pytest.raises(UserInputError, match="domain data built with this tokenizer.*built with tokenizer"):
        launch(_config(setup, tmp_path, tokenizer=other, hf_model=hf))


def test_vocab_not_divisible_for_tp_and_checkpoint_rows(setup, tmp_path) -> None:
    assert check_vocab(32000, 2).ok and not check_vocab(32000, 8).ok and check_vocab(32768, 8).ok
    with pytest.raises(UserInputError, match="tokenizer vocab 32000 must be a multiple of 128 x TP 8"):
        launch(_config(setup, tmp_path, profile="llama2-70b"))
    hf = llama_hf_folder(tmp_path / "hf", "7b", setup["tokenizer"] / "tokenizer.model", 32128)
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


def test_tiny_plan_is_its_own_with_no_false_failures(tmp_path_factory, tmp_path, capsys) -> None:
    """Issue 11: notebook 2 on tiny showed llama2-7b paths and a failed sequence-length check for the stand-in."""
    tiny = tiny_artifacts(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "outputs" / "tiny"
    plan = launch(LaunchConfig(profile="tiny", hf_model=tiny["hf_model"], tokenizer=tiny["tokenizer"],
                               domain_data=tiny["domain_data"], general_data=tiny["general_data"],
                               output=run_dir / "nemo_launch", run_dir=run_dir / "nemo_run", dry_run=True))
    printed = capsys.readouterr().out
    assert plan.ready and "FAILED" not in printed
    o = overrides(plan.torchrun)
    arch = json.loads((tiny["hf_model"] / "config.json").read_text())
    assert (o["model.encoder_seq_length"], o["model.hidden_size"], o["model.num_query_groups"]) == (
        "256", str(arch["hidden_size"]), str(arch["num_key_value_heads"]))
    assert plan.torchrun[:4] == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=1"]
    assert (o["trainer.precision"], o["model.megatron_amp_O2"]) == ("32", "False")
    assert o["model.sequence_parallel"] == "False"
    assert plan.trained_nemo == run_dir / "nemo_run" / "training" / "checkpoints" / "dapt.nemo"
    assert str(tiny["domain_data"]) in o["++model.data.data_prefix"] and "llama2-7b" not in printed
    assert plan.summary().startswith("In nvcr.io/nvidia/nemo:24.07 on 1 GPU(s), `bash ") and plan.summary() in printed


def test_llama2_parameter_counts() -> None:
    # published sizes of meta-llama/Llama-2-{7b,13b,70b}-hf
    assert parameter_count(LLAMA2_ARCH["7b"], 32000) == 6_738_415_616
    assert parameter_count(LLAMA2_ARCH["13b"], 32000) == 13_015_864_320
    assert parameter_count(LLAMA2_ARCH["70b"], 32000) == 68_976_648_192


def test_cli_refuses_cleanly_and_writes_nothing(tmp_path) -> None:
    """``python -m dapt launch``: help renders; bad values exit 2 with one message, no traceback, no folder."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "code")}
    run = [sys.executable, "-m", "dapt", "launch"]
    assert subprocess.run([*run, "--help"], env=env, capture_output=True).returncode == 0
    output = tmp_path / "launch"
    for args, message in ((["--max-steps", "0"], "--max-steps 0: must be a whole number of at least 1"),
                          (["--run-name", "dapt\ntouch pwned"], "--run-name 'dapt\\ntouch pwned': contains the "
                           "control character U+000A"),
                          (["--hf-model", str(tmp_path / "none")], f"nothing written to {output}")):
        done = subprocess.run([*run, "--dry-run", "--output", str(output), *args], env=env, capture_output=True,
                              text=True, cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
