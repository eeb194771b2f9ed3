"""The run folder: where each file of a NeMo run lives, and why.

``megatron_gpt_pretraining.py`` (r2.0.0rc1) calls ``exp_manager`` (line 41) before it restores the ``.nemo``
(lines 44-52). With ``resume_if_exists``, ``exp_manager.check_resume`` moves every FILE directly inside
``explicit_log_dir`` into ``run_N/`` (exp_manager.py lines 787-805; sub-folders stay). So the log directory is a
folder of its own, ``RUN_DIR/training``, that holds only what exp_manager and the trainer write; everything the
commands read or write besides (the converted ``.nemo``, the Slurm log, megatron's index cache) sits beside it::

    RUN_DIR/
      extended_model.nemo         HF -> .nemo, converted once (restore_from_path)
      .converting/                the conversion writes here first, then renames
      index_mapping/              megatron-core's sample index cache (model.data.index_mapping_dir)
      slurm/slurm-<job>.out       Slurm's log of each job (multi-node)
      training/                   exp_manager.explicit_log_dir: NeMo's logs, run_N/ of earlier runs
        checkpoints/              *-last checkpoints (resume) and the best by val_loss
        checkpoints/<name>.nemo   the trained model (save_nemo_on_train_end)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder (``run_dir``) for the exp_manager name ``run_name``."""

    run_dir: Path
    run_name: str

    @property
    def converted(self) -> Path:
        """The extended HF checkpoint converted to ``.nemo``: the model the training restores."""
        return self.run_dir / "extended_model.nemo"

    @property
    def converting(self) -> Path:
        """Where the converter writes before the file is renamed to :attr:`converted`."""
        return self.run_dir / ".converting" / "extended_model.nemo"

    @property
    def log_dir(self) -> Path:
        """``exp_manager.explicit_log_dir``: exp_manager's own folder, nothing else is kept in it."""
        return self.run_dir / "training"

    @property
    def checkpoints(self) -> Path:
        """exp_manager's ``configure_checkpointing``: ``dirpath = log_dir/checkpoints``."""
        return self.log_dir / "checkpoints"

    @property
    def trained(self) -> Path:
        """NeMoModelCheckpoint's ``on_train_end`` .nemo: ``checkpoints/<exp_manager.name>.nemo``."""
        return self.checkpoints / f"{self.run_name}.nemo"

    @property
    def index_mapping(self) -> Path:
        """``model.data.index_mapping_dir``: megatron-core caches its sample indices here."""
        return self.run_dir / "index_mapping"

    @property
    def slurm_logs(self) -> Path:
        """Folder of the Slurm job logs (it must exist before ``sbatch``: Slurm does not create it)."""
        return self.run_dir / "slurm"

    @property
    def slurm_output(self) -> Path:
        """``#SBATCH --output`` pattern (``%j``: the job id)."""
        return self.slurm_logs / "slurm-%j.out"
