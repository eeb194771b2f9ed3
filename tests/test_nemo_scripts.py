"""The generated scripts under hostile values: bash runs our commands and nothing else (issue 12, item 1).

``commands.sh`` and ``dapt.sbatch`` are executed for real with bash, with stand-ins for ``python``, ``torchrun``
and ``srun`` first on the PATH (they record their arguments and write what the converter would), so nothing of
NeMo or Slurm runs; a value that escaped its quoting would run ``touch pwned...`` in the working folder.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from pathlib import Path

import pytest
from nemo_fixtures import dry_run_config, llama2_setup, overrides, sbatch_arguments, stub_env

from dapt.errors import UserInputError
from dapt.nemo_launch import LaunchConfig, launch
from dapt.nemo_launch.commands import hydra_str

# Everything a shell or Slurm would read as syntax, no control character (those are refused: see below).
HOSTILE = "x $(touch pwned1) `touch pwned2`; touch pwned3 & | > 'sq' \"dq\" \\bs ${HOME} #* ?!~ ="


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama2_tokenizer, shared_data) -> dict[str, Path]:
    return llama2_setup(tmp_path_factory.mktemp("scripts"), llama2_tokenizer, shared_data)


def _calls(folder: Path) -> list[tuple[str, list[str]]]:
    """(program, arguments) of each call of a stand-in, in order."""
    calls = sorted((folder / "calls").glob("call-*"), key=lambda p: int(p.name.split("-")[1]))
    return [(path.name.split("-", 2)[2], path.read_bytes().decode().split("\0")[:-1]) for path in calls]


def _hostile_config(setup, tmp_path: Path, **kwargs) -> LaunchConfig:
    return dry_run_config(setup, tmp_path, run_dir=tmp_path / f"run {HOSTILE}", output=tmp_path / f"out {HOSTILE}",
                   run_name=f"dapt {HOSTILE}", slurm_partition=HOSTILE, slurm_account=HOSTILE,
                   nemo_dir=f"/opt/NeMo {HOSTILE}", **kwargs)


def test_commands_sh_runs_exactly_our_commands(setup, tmp_path) -> None:
    plan = launch(_hostile_config(setup, tmp_path))
    work = tmp_path / "cwd"
    work.mkdir()
    script = plan.settings.output / "commands.sh"
    subprocess.run(["bash", str(script)], cwd=work, env=stub_env(tmp_path / "stubs"), check=True)
    assert not list(tmp_path.rglob("pwned*"))
    assert _calls(tmp_path / "stubs") == [("python", plan.convert[1:]), ("torchrun", plan.torchrun[1:])]
    assert plan.layout.converted.is_file() and not plan.layout.converting.exists()
    assert overrides(plan.pretrain)["exp_manager.name"] == hydra_str(f"dapt {HOSTILE}")
    subprocess.run(["bash", str(script)], cwd=work, env=stub_env(tmp_path / "again"), check=True)
    assert [name for name, _ in _calls(tmp_path / "again")] == ["torchrun"]  # converted once: a rerun only trains


def test_commands_sh_of_a_multinode_profile_converts_then_points_at_sbatch(setup, tmp_path) -> None:
    """One node cannot train a profile of several nodes (Lightning stops at the world size): say what to run."""
    plan = launch(_hostile_config(setup, tmp_path, profile="llama2-7b-multinode"))
    work = tmp_path / "cwd"
    work.mkdir()
    done = subprocess.run(["bash", str(plan.settings.output / "commands.sh")], cwd=work,
                          env=stub_env(tmp_path / "stubs"), capture_output=True, text=True)
    assert done.returncode == 2 and not list(tmp_path.rglob("pwned*"))
    assert f"sbatch {plan.settings.output / 'dapt.sbatch'}" in done.stderr and "4 nodes x 8 GPUs" in done.stderr
    assert _calls(tmp_path / "stubs") == [("python", plan.convert[1:])]  # converted, never a one-node torchrun
    assert plan.layout.converted.is_file()


def test_sbatch_script_runs_exactly_our_commands(setup, tmp_path) -> None:
    plan = launch(_hostile_config(setup, tmp_path, profile="llama2-7b-multinode", container_image=HOSTILE))
    script = (plan.settings.output / "dapt.sbatch").read_text()
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    arguments = sbatch_arguments(script)
    assert {f"--partition={HOSTILE}", f"--account={HOSTILE}", "--time=04:00:00",
            f"--output={plan.layout.slurm_output}"} <= set(arguments)
    assert not [a for a in arguments if not a.startswith("--")]  # every value stayed with its option
    work = tmp_path / "cwd"
    work.mkdir()
    subprocess.run(["bash", "-c", script], cwd=work, env=stub_env(tmp_path / "stubs"), check=True)
    assert not list(tmp_path.rglob("pwned*"))
    assert _calls(tmp_path / "stubs") == [("python", plan.convert[1:]), ("python", plan.pretrain_slurm)]
    options = (tmp_path / "stubs" / "calls" / "srun-options").read_bytes().decode().split("\0")
    assert options.count(f"--container-image={HOSTILE}") == 2


SCRIPT_VALUES = ["hf_model", "tokenizer", "domain_data", "general_data", "output", "run_dir", "run_name",
                 "nemo_dir", "container_image", "slurm_partition", "slurm_account", "slurm_time"]


@pytest.mark.parametrize("option", SCRIPT_VALUES)
@pytest.mark.parametrize("control", ["\n", "\r", "\t", "\x00", "\x1b", "\u2028"])
def test_control_characters_are_refused_before_anything_is_written(setup, tmp_path, option, control) -> None:
    """``--run-name $'dapt\\ntouch pwned'`` wrote a line ``touch pwned.nemo`` into commands.sh that bash ran."""
    config = dry_run_config(setup, tmp_path)
    value = getattr(config, option)
    bad = Path(f"{value}{control}touch pwned") if isinstance(value, Path) else f"{value or 'x'}{control}touch pwned"
    flag = "--" + option.replace("_", "-")
    with pytest.raises(UserInputError, match=f"^{flag} .*control character U\\+{ord(control):04X}"):
        launch(dataclasses.replace(config, **{option: bad}))
    assert not (tmp_path / "launch").exists() and not list(tmp_path.rglob("pwned*"))


def test_every_line_quotes_its_values(setup, tmp_path) -> None:
    """Every word bash reads from commands.sh is one of our words: no value split or glued to another."""
    plan = launch(_hostile_config(setup, tmp_path))
    text = (plan.settings.output / "commands.sh").read_text()
    words = [shlex.split(line) for line in text.splitlines() if line and not line.startswith("#")]
    assert plan.torchrun in words and ["mv", str(plan.layout.converting), str(plan.layout.converted)] in words
    comments = [line for line in text.splitlines() if line.startswith("# trained model: ")]
    assert shlex.split(comments[0][len("# trained model: "):]) == [str(plan.trained_nemo)]
