"""The generated scripts: ``commands.sh`` (one node, what ``launch`` runs) and ``dapt.sbatch`` (Slurm + pyxis).

Every value on every line is quoted for the reader of that line: ``shlex.quote`` for bash, :func:`slurm_quote`
for ``#SBATCH`` lines, and the container mount list is refused when a folder cannot be written in it. Control
characters never reach this module (:func:`dapt.nemo_launch.settings.resolve` refuses them), so no value can
start a line of its own, comments included.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from dapt.nemo_launch.checks import Check
from dapt.nemo_launch.layout import RunLayout
from dapt.nemo_launch.settings import CONTAINER_IMAGE, LaunchSettings

# A pyxis mount list is "SRC:DST[:FLAGS],...": a folder holding ',' or ':' cannot be written in it.
_MOUNT_SEPARATORS = (",", ":")


def slurm_quote(value: str) -> str:
    """A value for an ``#SBATCH`` line. sbatch reads those lines itself (src/sbatch/opt.c, ``_get_argument``):
    ``"`` groups characters including spaces, a backslash takes the next character as it is, and an unescaped
    ``#`` ends the line's arguments. So the value is double-quoted with ``\\``, ``"`` and ``#`` escaped."""
    return '"' + re.sub(r'([\\"#])', r"\\\1", value) + '"'


def mount_folders(settings: LaunchSettings) -> list[Path]:
    """The folders the container needs: each input's folder and the run folder, the outermost of nested ones."""
    tokenizer = settings.tokenizer if settings.tokenizer.is_dir() or not settings.tokenizer.suffix else (
        settings.tokenizer.parent)
    folders = {settings.hf_model, tokenizer, settings.domain_data.parent, settings.layout.run_dir}
    if settings.general_data is not None:
        folders.add(settings.general_data.parent)
    return sorted(f for f in folders if not any(other != f and other in f.parents for other in folders))


def check_mounts(settings: LaunchSettings) -> Check:
    """Each input folder is mounted at its own path; never ``/`` or a parent of NeMo's checkout (it would hide
    the container's ``/opt/NeMo``), never a folder whose name the mount list cannot carry."""
    if not settings.container_image:
        return Check("container mounts", True, "no container (--container-image is empty)")
    problems = []
    nemo = Path(settings.nemo_dir)
    for folder in mount_folders(settings):
        if any(sep in str(folder) for sep in _MOUNT_SEPARATORS):
            problems.append(f"{folder} holds ',' or ':', which pyxis' --container-mounts list cannot carry")
        elif folder == nemo or folder in nemo.parents:
            problems.append(f"mounting {folder} would hide the container's {nemo}")
    detail = "; ".join(problems) or ", ".join(map(str, mount_folders(settings)))
    if problems:
        detail += "; move the inputs or the run folder (--run-dir), or pass --container-image '' to run without one"
    return Check("container mounts", not problems, detail)


def _container_options(settings: LaunchSettings) -> str:
    if not settings.container_image:
        return ""
    mounts = ",".join(f"{folder}:{folder}" for folder in mount_folders(settings))
    return (f" --container-image={shlex.quote(settings.container_image)}"
            f" --container-mounts={shlex.quote(mounts)}")


def _exports(env: dict[str, str]) -> str:
    lines = []
    if "NCCL_NVLS_ENABLE" in env:
        lines.append("# NCCL NVLink SHARP off: known NaN/hang workaround on NVSwitch systems")
    if "CUDA_DEVICE_MAX_CONNECTIONS" in env:
        lines.append("# sequence parallelism: megatron-core orders its kernels with one CUDA connection per device")
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    return "\n".join(lines) + "\n"


def convert_once(convert: list[str], layout: RunLayout) -> str:
    """Convert once: into a temporary folder, then renamed, so a crash never leaves a half ``.nemo``."""
    target, temp = shlex.quote(str(layout.converted)), shlex.quote(str(layout.converting))
    return (
        f"if [ ! -f {target} ]; then\n"
        f"  mkdir -p {shlex.quote(str(layout.converting.parent))}\n"
        f"  {shlex.join(convert)}\n"
        f"  mv {temp} {target}\n"
        "fi\n"
    )


def commands_script(settings: LaunchSettings, env: dict[str, str], convert: list[str], train: list[str]) -> str:
    """The single-node commands as a bash script (what ``launch`` runs on one node).

    For a profile of several nodes, one node cannot train it (Lightning would stop at the world size): the script
    converts the checkpoint, then says to submit ``dapt.sbatch`` and exits with status 2.
    """
    profile, layout = settings.profile, settings.layout
    if profile.num_nodes > 1:
        sbatch = shlex.quote(str(settings.output / "dapt.sbatch"))
        message = (f"profile {profile.name} trains on {profile.num_nodes} nodes x {profile.gpus_per_node} GPUs, "
                   f"which one node cannot run: submit it with sbatch {settings.output / 'dapt.sbatch'}")
        training = ("# (b) continued pretraining runs on several nodes: `sbatch dapt.sbatch` (srun on each node)\n"
                    f"echo {shlex.quote(message)} >&2\n"
                    "exit 2\n")
        where = f"on one node of the {profile.num_nodes}; training: sbatch {sbatch}"
    else:
        training = ("# (b) continued pretraining; rerunning resumes from the last checkpoint\n"
                    f"{shlex.join(train)}\n")
        where = f"with {profile.gpus_per_node} GPU(s)"
    return (
        "#!/bin/bash\n"
        f"# Generated by `python -m dapt launch --profile {profile.name}`; run inside {CONTAINER_IMAGE} {where}.\n"
        "set -euo pipefail\n"
        + _exports(env)
        + f"mkdir -p {shlex.quote(str(layout.run_dir))}\n"
        "# (a) HF -> .nemo (once)\n"
        + convert_once(convert, layout)
        + training
        + f"# trained model: {shlex.quote(str(layout.trained))}\n"
    )


def sbatch_script(settings: LaunchSettings, env: dict[str, str], convert: list[str], pretrain: list[str]) -> str:
    """A Slurm batch script: convert on one task, then ``srun`` one task per GPU on every node."""
    profile, layout = settings.profile, settings.layout
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={slurm_quote('dapt-' + profile.name)}",
        f"#SBATCH --nodes={profile.num_nodes}",
        f"#SBATCH --ntasks-per-node={profile.gpus_per_node}",
        f"#SBATCH --gpus-per-node={profile.gpus_per_node}",
        "#SBATCH --exclusive",
        f"#SBATCH --time={slurm_quote(settings.slurm_time)}",
        f"#SBATCH --output={slurm_quote(str(layout.slurm_output))}",
    ]
    if settings.slurm_partition:
        header.append(f"#SBATCH --partition={slurm_quote(settings.slurm_partition)}")
    if settings.slurm_account:
        header.append(f"#SBATCH --account={slurm_quote(settings.slurm_account)}")
    container = _container_options(settings)
    script = shlex.quote(str(settings.output / "dapt.sbatch"))
    stop = (f"NeMo stops and saves a checkpoint after {settings.max_time_per_run} (exp_manager.max_time_per_run)"
            if settings.max_time_per_run else "No time limit (UNLIMITED)")
    return "\n".join(header) + (
        f"\n# Generated by `python -m dapt launch --profile {profile.name}`.\n"
        f"# Submit with: mkdir -p {shlex.quote(str(layout.slurm_logs))} && sbatch {script}\n"
        f"# {stop}; resubmitting resumes from the last checkpoint (exp_manager.resume_if_exists=True).\n"
        "set -euo pipefail\n"
        + _exports(env)
        + f"mkdir -p {shlex.quote(str(layout.run_dir))}\n\n"
        "# (a) HF -> .nemo, once, on one task\n"
        f"srun --nodes=1 --ntasks=1{container} bash -c {shlex.quote(convert_once(convert, layout))}\n\n"
        "# (b) continued pretraining: one task per GPU; PyTorch Lightning takes ranks from Slurm\n"
        f"srun{container} python {shlex.join(pretrain)}\n"
    )


def check_slurm_log_path(settings: LaunchSettings) -> Check:
    """Slurm expands ``%`` patterns in ``--output`` (``%j`` is ours): a run folder holding ``%`` is refused."""
    folder = str(settings.layout.slurm_logs)
    return Check("Slurm log path", "%" not in folder,
                 f"{folder} (Slurm would read '%' in it as a file name pattern; choose a --run-dir without '%')"
                 if "%" in folder else folder)

