"""The ``launch`` stage: build the plan, print it, write the scripts, and (with NeMo and the GPUs) run them."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapt.artifacts import jsonable, stage_output
from dapt.errors import UserInputError
from dapt.megatron_data import build_blend
from dapt.nemo_launch.checks import Check, Inputs, environment_problems, run_checks
from dapt.nemo_launch.commands import (
    convert_command,
    launch_env,
    pretrain_argv,
    pretrain_overrides,
    torchrun_command,
)
from dapt.nemo_launch.layout import RunLayout
from dapt.nemo_launch.scripts import check_mounts, check_slurm_log_path, commands_script, sbatch_script
from dapt.nemo_launch.settings import CONTAINER_IMAGE, LaunchConfig, LaunchSettings, resolve
from dapt.nemo_launch.sizing import estimate_memory_gb


@dataclass
class LaunchPlan:
    """Everything ``launch`` prints, writes and runs."""

    settings: LaunchSettings
    checks: list[Check]
    inputs: Inputs
    blend: dict[str, list[str]]
    env: dict[str, str]
    convert: list[str]
    pretrain: list[str]  # megatron_gpt_pretraining.py and its overrides, as commands.sh runs it
    pretrain_slurm: list[str]  # the same for dapt.sbatch, with NeMo's stop before the Slurm time limit
    torchrun: list[str]
    sizing: dict[str, Any]

    @property
    def layout(self) -> RunLayout:
        return self.settings.layout

    @property
    def trained_nemo(self) -> Path:
        """Where the trained ``.nemo`` lands (input of ``python -m dapt export``)."""
        return self.layout.trained

    @property
    def ready(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def multinode(self) -> bool:
        return self.settings.profile.num_nodes > 1

    def summary(self) -> str:
        """One sentence: what running the plan does, on the GPUs it is made for."""
        s, profile = self.settings, self.settings.profile
        where = (f"{profile.num_nodes} nodes x {profile.gpus_per_node} GPUs, `sbatch {s.output / 'dapt.sbatch'}`"
                 if self.multinode else
                 f"{profile.gpus_per_node} GPU(s), `bash {s.output / 'commands.sh'}`")
        return (f"In {CONTAINER_IMAGE} on {where} converts {s.hf_model} to {self.layout.converted} once, trains "
                f"{s.max_steps} steps of {s.global_batch_size} sequences x {profile.seq_length} tokens (TP "
                f"{profile.tensor_parallel}, PP {profile.pipeline_parallel}, precision {s.precision}), validating "
                f"every {s.val_check_interval} steps, and writes the trained model to {self.trained_nemo}.")


def build_plan(config: LaunchConfig) -> LaunchPlan:
    """Resolve the parameters, run every check and build the commands (nothing is run or written)."""
    settings = resolve(config)
    checks, inputs = run_checks(settings)
    checks += [check_mounts(settings), check_slurm_log_path(settings)]
    blend = build_blend(settings.domain_data, settings.general_data, settings.general_share)
    convert = convert_command(settings.nemo_dir, settings.hf_model, settings.layout.converting)
    pretrain = pretrain_argv(settings.nemo_dir, pretrain_overrides(settings, inputs.arch, blend, None))
    pretrain_slurm = pretrain_argv(
        settings.nemo_dir, pretrain_overrides(settings, inputs.arch, blend, settings.max_time_per_run)
    )
    vocab = inputs.vocab_size or inputs.arch.get("vocab_size", 32000)
    return LaunchPlan(
        settings=settings,
        checks=checks,
        inputs=inputs,
        blend=blend,
        env=launch_env(settings),
        convert=convert,
        pretrain=pretrain,
        pretrain_slurm=pretrain_slurm,
        torchrun=torchrun_command(settings.profile.gpus_per_node, pretrain),
        sizing=estimate_memory_gb(inputs.arch, vocab, settings.profile, settings.micro_batch_size),
    )


def print_plan(plan: LaunchPlan) -> None:
    """The checks, the memory estimate and the commands, as a shell reader would run them."""
    profile = plan.settings.profile
    print(f"# profile {profile.name}: {profile.description}")
    for check in plan.checks:
        print(f"#   [{'ok' if check.ok else 'FAILED'}] {check.name}: {check.detail}")
    sizing = plan.sizing
    print(f"#   memory estimate per GPU: {sizing['total_gb']} GB of {profile.gpu_memory_gb} GB "
          f"({_count(sizing['parameters'])} parameters; architecture: {plan.inputs.arch_source})")
    print(f"# {plan.summary()}")
    for name, value in plan.env.items():
        print(f"export {name}={shlex.quote(value)}")
    print(shlex.join(plan.convert))
    if plan.multinode:
        print(f"sbatch {shlex.quote(str(plan.settings.output / 'dapt.sbatch'))}")
    else:
        print(shlex.join(plan.torchrun))
    print(f"# trained model: {shlex.quote(str(plan.trained_nemo))}")


def _count(number: int) -> str:
    return f"{number / 1e9:.2f}B" if number >= 1e9 else f"{number / 1e6:.1f}M"


def plan_record(plan: LaunchPlan) -> dict[str, Any]:
    """``launch_plan.json``: the commands as argument lists, the layout, the checks and the estimate."""
    layout = plan.layout
    return {
        "profile": dataclasses.asdict(plan.settings.profile),
        "env": plan.env,
        "convert": plan.convert,
        "pretrain_torchrun": plan.torchrun,
        "pretrain_slurm": plan.pretrain_slurm,
        "blend": plan.blend,
        "layout": {name: str(getattr(layout, name)) for name in
                   ("run_dir", "converted", "log_dir", "checkpoints", "trained", "index_mapping", "slurm_output")},
        "converted_nemo": str(layout.converted),
        "trained_nemo": str(layout.trained),
        "max_time_per_run": plan.settings.max_time_per_run,
        "checks": [dataclasses.asdict(c) for c in plan.checks],
        "ready": plan.ready,
        "sizing": plan.sizing,
        "summary": plan.summary(),
    }


def write_plan(config: LaunchConfig, plan: LaunchPlan) -> Path:
    """``commands.sh``, ``dapt.sbatch``, ``launch_plan.json`` and the manifest, written atomically."""
    settings = plan.settings
    inputs = {
        name: {"prefix": str(getattr(settings, f"{name}_data")), "tokenizer_sha256": record["tokenizer_sha256"]}
        for name, record in plan.inputs.data_records.items()
    }
    with stage_output(settings.output, "launch", config, inputs) as folder:
        (folder / "commands.sh").write_text(
            commands_script(settings, plan.env, plan.convert, plan.torchrun), encoding="utf-8"
        )
        (folder / "dapt.sbatch").write_text(
            sbatch_script(settings, plan.env, plan.convert, plan.pretrain_slurm), encoding="utf-8"
        )
        (folder / "launch_plan.json").write_text(
            json.dumps(jsonable(plan_record(plan)), indent=2) + "\n", encoding="utf-8"
        )
        for name in ("commands.sh", "dapt.sbatch"):
            (folder / name).chmod(0o755)
    return settings.output


def launch(config: LaunchConfig) -> LaunchPlan:
    """Check everything, write the commands; unless ``dry_run``, run them (needs NeMo and the GPUs).

    Raises :class:`UserInputError`, with nothing written, when a value or a check fails; and (not a dry run)
    after writing the commands, when NeMo, the scripts, Slurm or the GPUs are missing: it then says why it does
    not run them. It never pretends to have trained.
    """
    plan = build_plan(config)
    print_plan(plan)
    failed = [c for c in plan.checks if not c.ok]
    if failed:
        raise UserInputError(
            f"nothing written to {plan.settings.output}; these checks failed:\n  "
            + "\n  ".join(f"{c.name}: {c.detail}" for c in failed)
        )
    write_plan(config, plan)
    print(f"# commands written to {plan.settings.output}")
    if config.dry_run:
        return plan
    problems = environment_problems(plan.settings)
    if problems:
        raise UserInputError(
            f"the commands above (written to {plan.settings.output}) were not run:\n  " + "\n  ".join(problems)
        )
    run(plan)
    return plan


def run(plan: LaunchPlan) -> None:
    """Run the written scripts: ``sbatch dapt.sbatch`` for several nodes, else ``bash commands.sh``."""
    output, layout = plan.settings.output, plan.layout
    if plan.multinode:
        layout.slurm_logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create the --output folder
    command = ["sbatch", str(output / "dapt.sbatch")] if plan.multinode else ["bash", str(output / "commands.sh")]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise UserInputError(f"`{shlex.join(command)}` failed with exit status {result.returncode}; see the "
                             f"output above and NeMo's logs in {layout.log_dir}.")
    if plan.multinode:
        print(f"submitted; the trained model will be {plan.trained_nemo}")
        return
    if not plan.trained_nemo.is_file():
        raise UserInputError(f"training ended without {plan.trained_nemo}; see NeMo's logs in {layout.log_dir}.")
    print(f"trained model: {plan.trained_nemo}")
