"""Stage ``launch``: HF -> ``.nemo`` conversion and NeMo continued pretraining, for the NeMo 24.07 container.

From a profile and the artifacts of the earlier stages this stage checks, writes and (inside the container, on
GPUs) runs:

(a) ``convert_llama_hf_to_nemo.py`` on the extended HF checkpoint (its ``tokenizer.model``, the adapted one, is
    packed into the ``.nemo``);
(b) ``megatron_gpt_pretraining.py`` restoring that ``.nemo`` with the adapted tokenizer, the domain + replay data
    blend, TP/PP, sequence length, batch sizes, precision, ChipNeMo's optimiser settings, checkpointing with
    resume, and ``save_nemo_on_train_end`` so that the trained model lands at
    ``RUN_DIR/training/checkpoints/<name>.nemo``;
(c) ``torchrun`` on one node (``commands.sh``), or a Slurm ``sbatch`` script, one task per GPU, for several.

Without NeMo or without enough GPUs it prints and writes the commands and says why it does not run them.

Modules, in the order the stage uses them:

* ``settings``: ``LaunchConfig`` (the parameters) and their resolution into checked final values;
* ``layout``: the run folder, where each file lives and why (exp_manager moves loose files of its log folder);
* ``checks``: inputs, GPU grid, batch sizes, schedule, vocabulary; the environment for a real run;
* ``commands``: the converter and pretraining command lines, every Hydra key with its NeMo source;
* ``scripts``: ``commands.sh`` and ``dapt.sbatch``, every value quoted for its line, the container mounts;
* ``sizing``: Llama 2 shapes, parameter counts, a per-GPU memory estimate;
* ``stage``: the plan, printed, written and run;
* ``smoke``: the logits comparison of the container smoke test (``scripts/container_smoke_test.sh``).
"""

from dapt.nemo_launch.checks import Check, check_gpus, check_vocab
from dapt.nemo_launch.layout import RunLayout
from dapt.nemo_launch.settings import LaunchConfig
from dapt.nemo_launch.sizing import LLAMA2_ARCH, estimate_memory_gb, parameter_count
from dapt.nemo_launch.stage import LaunchPlan, build_plan, launch

__all__ = [
    "LLAMA2_ARCH",
    "Check",
    "LaunchConfig",
    "LaunchPlan",
    "RunLayout",
    "build_plan",
    "check_gpus",
    "check_vocab",
    "estimate_memory_gb",
    "launch",
    "parameter_count",
]
