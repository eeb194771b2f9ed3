"""(c) NeMo's exp_manager on the run folder as our scripts leave it (issue 10): needs NeMo 2.0.0rc1.

``megatron_gpt_pretraining.py`` calls ``exp_manager(trainer, cfg.exp_manager)`` before it restores the ``.nemo``;
with ``resume_if_exists`` exp_manager moves every file directly inside the log directory into ``run_N/``. Here the
folder is laid out by running the generated ``commands.sh`` or ``dapt.sbatch`` itself (stand-ins for the converter,
torchrun and srun write what they would; for a profile of several nodes ``commands.sh`` only converts and then
points at ``dapt.sbatch``), Slurm's log is created where ``#SBATCH --output`` says, and NeMo's own exp_manager runs
with the composed config on a CPU Lightning trainer; then every file the next command reads must still be where
that command looks for it. Again with a previous ``*-last`` checkpoint: the resume case.

:func:`exercise_run_folder` takes only the scripts' text and the composed config, so the same check runs on the
layout of an older version of the stage (it failed there: the converted ``.nemo`` sat in the log directory).
"""

from __future__ import annotations

import datetime
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nemo_fixtures import ALL_PROFILES, profile_case, sbatch_arguments, stub_env

JOB_ID = "4242"


def _slurm_log(sbatch: str) -> Path:
    output = next(a for a in sbatch_arguments(sbatch) if a.startswith("--output="))
    return Path(output.split("=", 1)[1].replace("%j", JOB_ID))


def _inputs_read(cfg: dict[str, Any], sbatch: str) -> dict[str, Path]:
    """Every file the pretraining command reads (and the Slurm log Slurm keeps writing), by what it is."""
    model = cfg["model"]
    files = {"restore_from_path": Path(model["restore_from_path"]), "tokenizer": Path(model["tokenizer"]["model"]),
             "Slurm log": _slurm_log(sbatch)}
    for split, parts in model["data"]["data_prefix"].items():
        for prefix in parts[1::2]:
            for suffix in (".bin", ".idx"):
                files[f"{split} {Path(prefix).name}{suffix}"] = Path(prefix + suffix)
    return files


def _cpu_trainer(cfg: dict[str, Any]):
    import pytorch_lightning as pl

    trainer = cfg["trainer"]
    return pl.Trainer(accelerator="cpu", devices=1, num_nodes=1, logger=False, enable_checkpointing=False,
                      max_steps=trainer["max_steps"], val_check_interval=trainer["val_check_interval"],
                      limit_val_batches=trainer["limit_val_batches"], max_epochs=trainer["max_epochs"])


def exercise_run_folder(script: Path, sbatch: str, cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run ``script`` (commands.sh or dapt.sbatch, with stand-ins), create Slurm's log, run NeMo's exp_manager
    twice (fresh, then resuming from a ``*-last`` checkpoint); report the inputs missing after each, the trainers
    and the log dir."""
    from nemo.utils.exp_manager import exp_manager

    subprocess.run(["bash", str(script)], cwd=work, env=stub_env(work / "stubs"), check=True)
    slurm_log = _slurm_log(sbatch)
    slurm_log.parent.mkdir(parents=True, exist_ok=True)
    slurm_log.write_text("job 4242 started\n")
    inputs = _inputs_read(cfg, sbatch)
    assert all(path.is_file() for path in inputs.values()), {k: p for k, p in inputs.items() if not p.is_file()}
    report: dict[str, Any] = {"inputs": inputs}
    first = _cpu_trainer(cfg)
    exp_manager(first, cfg["exp_manager"])
    report["first"] = {"trainer": first, "missing": {k: str(p) for k, p in inputs.items() if not p.is_file()}}
    log_dir = Path(cfg["exp_manager"]["explicit_log_dir"])
    last = log_dir / "checkpoints" / "megatron_gpt--val_loss=2.00-step=10-consumed_samples=80.0-last"
    last.mkdir(parents=True)
    (last / "metadata.json").write_text("{}\n")  # a distributed checkpoint is a folder
    second = _cpu_trainer(cfg)
    exp_manager(second, cfg["exp_manager"])
    report["resume"] = {"trainer": second, "checkpoint": last,
                        "missing": {k: str(p) for k, p in inputs.items() if not p.is_file()}}
    report["log_dir"] = log_dir
    return report


@pytest.mark.parametrize("variant", ["commands", "slurm"])
@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_c_exp_manager_leaves_every_input_where_the_next_command_reads_it(request, tmp_path, profile,
                                                                           variant) -> None:
    plan, found = profile_case(request, profile)
    from nemo.utils.callbacks.nemo_model_checkpoint import NeMoModelCheckpoint
    from nemo.utils.exp_manager import StatelessTimer

    cfg = found["composed"][profile][variant]["config"]
    # a run folder of its own for this case: the plan's scripts and config with its run folder moved here
    work = tmp_path / "work"
    work.mkdir()
    old, new = str(plan.layout.run_dir), str(tmp_path / "run")
    relocated = tmp_path / "commands.sh"
    relocated.write_text((plan.settings.output / "commands.sh").read_text().replace(old, new))
    sbatch = (plan.settings.output / "dapt.sbatch").read_text().replace(old, new)
    cfg = _relocate(cfg, old, new)
    if plan.multinode and variant == "commands":  # converts, then refuses: several nodes train through sbatch
        done = subprocess.run(["bash", str(relocated)], cwd=work, env=stub_env(work / "stubs"), capture_output=True,
                              text=True)
        assert done.returncode == 2 and "sbatch" in done.stderr
        assert Path(cfg["model"]["restore_from_path"]).is_file()
        return
    script = relocated
    if variant == "slurm":  # the folder as dapt.sbatch leaves it (the srun stand-in runs its command)
        script = tmp_path / "dapt.sbatch"
        script.write_text(sbatch)
    report = exercise_run_folder(script, sbatch, cfg, work)
    assert report["first"]["missing"] == {} and report["resume"]["missing"] == {}
    resume = report["resume"]["trainer"]
    assert resume.ckpt_path == str(report["resume"]["checkpoint"])
    assert (report["log_dir"] / "run_0").is_dir()  # exp_manager moved the first run's own logs there
    checkpoint = next(c for c in resume.callbacks if isinstance(c, NeMoModelCheckpoint))
    trained = Path(new) / plan.trained_nemo.relative_to(old)
    assert Path(checkpoint._format_nemo_checkpoint_name()) == trained
    assert (checkpoint.save_top_k, checkpoint.save_last) == (plan.settings.save_top_k, True)
    commented = next(line for line in relocated.read_text().splitlines() if line.startswith("# trained model: "))
    assert shlex.split(commented[len("# trained model: "):]) == [str(trained)]
    timers = [c for c in resume.callbacks if isinstance(c, StatelessTimer)]
    if variant == "slurm" and plan.settings.max_time_per_run:
        days, hours, minutes, seconds = map(int, plan.settings.max_time_per_run.split(":"))
        limit = datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        assert [t._duration for t in timers] == [limit.total_seconds()]
    else:
        assert timers == []


def _relocate(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    return value.replace(old, new) if isinstance(value, str) else value
