"""Continued pretraining on CPU for small models, on the HF Trainer.

Reads the same Megatron ``.bin``/``.idx`` files as the NeMo launch and gives every
hyperparameter the same meaning: ``seq_length`` tokens predicted per sample,
``micro_batch_size`` samples per forward pass, ``global_batch_size`` samples per
optimizer step (gradient accumulation makes up the difference), a linear warmup
to a constant learning rate, AdamW with betas 0.9/0.95 and decoupled weight decay
(biases and norms exempt, as in Megatron), gradient clipping at 1.0, and a
domain/general blend whose general share is a parameter.

Samples are drawn like Megatron's ``GPTDataset``: documents (each ending with EOD)
are concatenated in a seeded shuffled order per epoch and cut into windows of
``seq_length + 1`` tokens that overlap by one token (inputs = window[:-1],
labels = window[1:]); windows are shuffled with a seeded permutation per epoch; the
blend picks, for every sample, the dataset furthest behind its target share (the
rule of Megatron's ``BlendedDataset``), so the mixture is exact and reproducible.

Checkpoints go to ``<output>_checkpoints`` (a separate folder, because the final
output folder is written atomically); a rerun with the same inputs and parameters
resumes from the latest one (or reuses it when it already reached ``max_steps``). A
rerun whose inputs changed (another tokenizer, model, data or hyperparameters) says
what changed in one line and trains afresh from the given model, removing the old
checkpoints and the stale output (``--on-changed-inputs refuse`` stops instead).
Checkpoints hold no pickle files (:mod:`dapt.safe_checkpoint`): a checkpoint folder
with files this stage did not write is refused, never loaded. Training stops at
``max_steps`` or when ``time_budget_s`` is spent, whichever comes first.

Why one module (about 750 lines): its three parts, the Megatron-like sampling, the run identity that decides
resume or restart, and the Trainer wiring, are one contract with the NeMo launch (the same files, the same
meaning of each hyperparameter); they are reviewed together, top to bottom, whenever that contract changes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dapt.artifacts import file_sha256, output_lock, read_manifest, stage_output, write_json
from dapt.config import DEFAULT_OUTPUTS, get_profile, param
from dapt.errors import UserInputError
from dapt.megatron_data import read_data_record, sidecar_path, split_prefix
from dapt.safe_checkpoint import checkpoint_problem, is_sealed, materialised, seal_checkpoint

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
RUN_CONFIG = "run_config.json"
# Parameters that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("max_steps", "time_budget_s", "save_interval", "log_interval", "threads")
IDENTITY_FORMAT = 2  # version of the run identity kept in run_config.json and the output's manifest


class TrainInputError(UserInputError):
    """Training refused its model, data or hyperparameters; the message says what to change."""


@dataclass
class TrainConfig:
    """Parameters of ``python -m dapt train``; unset hyperparameters come from the profile."""

    model: Path = param(DEFAULT_OUTPUTS / "tiny" / "extended_model",
                        "HF causal-LM checkpoint folder to continue pretraining (must hold tokenizer.model)")
    data_prefix: Path = param(DEFAULT_OUTPUTS / "tiny" / "megatron_data" / "domain",
                              "domain data prefix: PREFIX_train_text_document.bin/.idx and PREFIX.dapt.json")
    general_prefix: Path | None = param(DEFAULT_OUTPUTS / "tiny" / "megatron_data" / "general",
                                           "general (replay) data prefix; used when the general share is > 0")
    output: Path = param(DEFAULT_OUTPUTS / "tiny" / "dapt_model", "output HF checkpoint folder")
    checkpoint_dir: Path | None = param(None, "checkpoints folder; None: <output>_checkpoints")
    profile: str = param("tiny", "named profile giving every hyperparameter left unset")
    general_share: float | None = param(None, "share of samples drawn from the general data (0 = no replay)")
    seq_length: int | None = param(None, "tokens predicted per sample")
    micro_batch_size: int | None = param(None, "samples per forward/backward pass")
    global_batch_size: int | None = param(None, "samples per optimizer step (multiple of the micro batch)")
    learning_rate: float | None = param(None, "constant learning rate reached after the warmup")
    warmup_steps: int | None = param(None, "steps of linear warmup from 0 (must be below max_steps)")
    max_steps: int | None = param(None, "optimizer steps to run")
    weight_decay: float | None = param(None, "decoupled weight decay (biases and norms exempt)")
    adam_beta1: float | None = param(None, "Adam beta1")
    adam_beta2: float | None = param(None, "Adam beta2")
    max_grad_norm: float = param(1.0, "gradient clipping norm (NeMo's gradient_clip_val)")
    time_budget_s: float | None = param(None, "stop (and save) after this many seconds of training")
    save_interval: int = param(50, "save a resumable checkpoint every this many steps")
    log_interval: int = param(10, "log the loss every this many steps")
    validation_windows: int = param(16, "windows of each validation split scored at the end (0 = skip)")
    seed: int = param(1234, "seed for the sample order, the blend and the model")
    threads: int | None = param(None, "torch CPU threads; None: torch's choice")
    resume: bool = param(True, "resume from the latest checkpoint; --no-resume deletes old checkpoints first")
    on_changed_inputs: Literal["restart", "refuse"] = param(
        "restart", "when the checkpoints come from other inputs or hyperparameters: restart (say why, delete "
        "them and the stale output, train afresh) or refuse (stop with an error, change nothing)")


@dataclass(frozen=True)
class Hyperparameters:
    """Concrete values of every training hyperparameter, after the profile fills the gaps."""

    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    learning_rate: float
    warmup_steps: int
    max_steps: int
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    max_grad_norm: float
    general_share: float

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.global_batch_size // self.micro_batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length


def resolve_hyperparameters(config: TrainConfig) -> Hyperparameters:
    """Fill unset hyperparameters from the profile and check that they make a possible run."""
    try:
        profile = get_profile(config.profile)
    except ValueError as error:
        raise TrainInputError(f"--profile: {error}") from None
    values = {
        name: getattr(config, name) if getattr(config, name) is not None else getattr(profile, name)
        for name in ("seq_length", "micro_batch_size", "global_batch_size", "learning_rate", "warmup_steps",
                     "max_steps", "weight_decay", "adam_beta1", "adam_beta2", "general_share")
    }
    hp = Hyperparameters(max_grad_norm=config.max_grad_norm, **values)
    validate_hyperparameters(hp)
    validate_run_settings(config)
    return hp


def validate_run_settings(config: TrainConfig) -> None:
    """Refuse intervals, budgets, thread counts and seeds that cannot work (never replace them)."""
    at_least = {"save_interval": 1, "log_interval": 1, "validation_windows": 0, "seed": 0}
    if config.threads is not None:
        at_least["threads"] = 1
    for name, low in at_least.items():
        value = getattr(config, name)
        if value < low:
            raise TrainInputError(f"--{name.replace('_', '-')} must be at least {low} (got {value}).")
    if config.time_budget_s is not None and not config.time_budget_s > 0:
        raise TrainInputError(f"--time-budget-s must be positive, or left unset (got {config.time_budget_s}).")


def validate_hyperparameters(hp: Hyperparameters) -> None:
    """Refuse impossible batch sizes, schedules and shares with a message naming the parameter."""
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "max_steps"):
        if getattr(hp, name) < 1:
            raise TrainInputError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(hp, name)}).")
    if hp.global_batch_size % hp.micro_batch_size:
        raise TrainInputError(
            f"--global-batch-size {hp.global_batch_size} is not a multiple of --micro-batch-size "
            f"{hp.micro_batch_size}; gradient accumulation needs a whole number of micro batches."
        )
    if not 0 <= hp.warmup_steps < hp.max_steps:
        raise TrainInputError(
            f"--warmup-steps {hp.warmup_steps} must be >= 0 and below --max-steps {hp.max_steps}, "
            "or the learning rate never reaches its target."
        )
    if not 0.0 <= hp.general_share < 1.0:
        raise TrainInputError(f"--general-share must be in [0, 1) (got {hp.general_share}).")
    if not hp.learning_rate > 0:
        raise TrainInputError(f"--learning-rate must be positive (got {hp.learning_rate}).")
    if not hp.weight_decay >= 0:
        raise TrainInputError(f"--weight-decay must be at least 0 (got {hp.weight_decay}).")
    if not hp.max_grad_norm >= 0:
        raise TrainInputError(f"--max-grad-norm must be at least 0 (0 = no clipping; got {hp.max_grad_norm}).")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(hp, name) < 1.0:
            raise TrainInputError(f"--{name.replace('_', '-')} must be in [0, 1) (got {getattr(hp, name)}).")


# --- data ---------------------------------------------------------------------------------------------


def _import_indexed_dataset() -> type:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron.core warns about absent Apex/Transformer Engine on import
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset


def read_data_sidecar(prefix: Path) -> dict[str, Any]:
    """The ``PREFIX.dapt.json`` record of a dataset (tokenizer hash, vocab size, EOD id)."""
    meta = read_data_record(prefix)
    missing = [k for k in ("tokenizer_sha256", "vocab_size", "eod_id") if k not in meta]
    if missing:
        raise TrainInputError(f"{sidecar_path(prefix)} lacks {missing}; rebuild the data with `python -m dapt data`.")
    return meta


def open_split(prefix: Path, split: str) -> Any:
    """Open one split of a dataset as a megatron-core ``IndexedDataset``."""
    path = split_prefix(prefix, split)
    for suffix in (".bin", ".idx"):
        if not Path(f"{path}{suffix}").is_file():
            raise TrainInputError(f"data file {path}{suffix} is missing; run `python -m dapt data`.")
    dataset = _import_indexed_dataset()(str(path))
    if len(dataset) == 0 or int(np.sum(dataset.sequence_lengths)) == 0:
        raise TrainInputError(f"data split {path} holds no tokens; give the data stage more documents.")
    return dataset


def check_data_matches_model(prefix: Path, meta: dict[str, Any], tokenizer_sha: str, vocab_rows: int) -> None:
    """Refuse data built with another tokenizer or with ids beyond the model's embedding rows."""
    if meta["tokenizer_sha256"] != tokenizer_sha:
        raise TrainInputError(
            f"data {prefix} was built with another tokenizer (sha256 {meta['tokenizer_sha256'][:12]}...) "
            f"than the model's tokenizer.model (sha256 {tokenizer_sha[:12]}...); rebuild the data with "
            "`python -m dapt data --tokenizer <the model's tokenizer folder>`."
        )
    if int(meta["vocab_size"]) > vocab_rows:
        raise TrainInputError(
            f"data {prefix} uses a vocabulary of {meta['vocab_size']} tokens but the model has only "
            f"{vocab_rows} embedding rows; extend the model with `python -m dapt embeddings` first."
        )


class WindowStream:
    """Fixed-length training windows over one indexed dataset, in Megatron GPTDataset's manner.

    Epoch ``e`` concatenates all documents in a permutation seeded by ``(seed, e)``;
    epochs follow each other in one endless token stream. Window ``k`` of the
    stream covers tokens ``[k * L, k * L + L + 1)`` (``L`` = sequence length), and
    windows are served in a seeded permuted order within each block of one epoch's
    worth of windows, so the order never depends on how long the run is.
    """

    def __init__(self, dataset: Any, seq_length: int, seed: int) -> None:
        self.dataset = dataset
        self.seq_length = seq_length
        self.seed = seed
        self.lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
        self.epoch_tokens = int(self.lengths.sum())
        self.windows_per_block = max(1, self.epoch_tokens // seq_length)
        self._epoch_orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._block_perms: dict[int, np.ndarray] = {}

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._epoch_orders:
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.lengths))
            self._epoch_orders[epoch] = (order, np.cumsum(self.lengths[order]))
            if len(self._epoch_orders) > 4:
                self._epoch_orders.pop(min(self._epoch_orders))
        return self._epoch_orders[epoch]

    def tokens(self, start: int, count: int) -> np.ndarray:
        """``count`` tokens of the endless stream from position ``start``."""
        pieces = []
        while count > 0:
            epoch, offset = divmod(start, self.epoch_tokens)
            order, ends = self._epoch_order(epoch)
            position = int(np.searchsorted(ends, offset, side="right"))
            doc_start = int(ends[position] - self.lengths[order[position]])
            take = min(count, int(ends[position]) - offset)
            pieces.append(self.dataset.get(int(order[position]), offset - doc_start, take))
            start += take
            count -= take
        return np.concatenate(pieces).astype(np.int64, copy=False)

    def window(self, index: int) -> np.ndarray:
        """The ``index``-th window served (``seq_length + 1`` tokens)."""
        block, within = divmod(index, self.windows_per_block)
        if block not in self._block_perms:
            self._block_perms = {block: np.random.default_rng([self.seed, 1, block]).permutation(
                self.windows_per_block)}
        stream_index = block * self.windows_per_block + int(self._block_perms[block][within])
        return self.tokens(stream_index * self.seq_length, self.seq_length + 1)


def blend_order(weights: list[float]) -> Iterator[tuple[int, int]]:
    """Endless ``(dataset, sample-within-dataset)`` pairs that keep each dataset at its share.

    Each step picks the dataset whose sample count lags its target ``weight * (i + 1)``
    the most (ties to the lower index), the rule Megatron's BlendedDataset uses.
    """
    target = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    counts = np.zeros(len(target), dtype=np.int64)
    i = 0
    while True:
        chosen = int(np.argmax(target * (i + 1) - counts))
        yield chosen, int(counts[chosen])
        counts[chosen] += 1
        i += 1


def _as_example(window: np.ndarray) -> dict[str, Any]:
    import torch

    tokens = torch.from_numpy(window)
    return {"input_ids": tokens[:-1], "labels": tokens[1:]}


def _blended_dataset_class() -> type:
    import torch

    class BlendedWindows(torch.utils.data.IterableDataset):
        """Endless blended training samples; the Trainer stops at max_steps and skips on resume."""

        def __init__(self, streams: list[WindowStream], weights: list[float]) -> None:
            super().__init__()
            self.streams = streams
            self.weights = weights

        def __iter__(self) -> Iterator[dict[str, Any]]:
            for dataset_index, sample_index in blend_order(self.weights):
                yield _as_example(self.streams[dataset_index].window(sample_index))

    return BlendedWindows


# --- model --------------------------------------------------------------------------------------------


def load_model(folder: Path) -> Any:
    """Load an HF causal LM in fp32 with PyTorch SDPA attention (about 3x faster than eager on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa")
    return model.to(torch.float32)


def check_model_folder(folder: Path) -> str:
    """The sha256 of the model folder's tokenizer.model; refuse folders that cannot be trained."""
    if not (folder / "config.json").is_file():
        raise TrainInputError(f"--model {folder} is not an HF checkpoint folder (no config.json).")
    tokenizer = folder / "tokenizer.model"
    if not tokenizer.is_file():
        raise TrainInputError(
            f"--model {folder} has no tokenizer.model; the data's tokenizer can only be checked against it."
        )
    return file_sha256(tokenizer)


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer files that exist in ``source`` (so the output loads with its own tokenizer)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


# --- trainer ------------------------------------------------------------------------------------------


def _trainer_classes() -> tuple[type, type]:
    import torch
    from transformers import Trainer, TrainerCallback

    class WindowTrainer(Trainer):
        """HF Trainer whose loss is the mean cross entropy over every label of the window (as Megatron)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # The loss below is a plain mean: let the Trainer divide by the accumulation steps.
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # noqa: ANN001
            logits = model(input_ids=inputs["input_ids"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), inputs["labels"].reshape(-1)
            )
            return (loss, logits) if return_outputs else loss

    class BudgetAndSpeed(TrainerCallback):
        """Stops (and saves) when the time budget is spent; measures throughput including saving."""

        def __init__(self, budget_s: float | None) -> None:
            self.budget_s = budget_s
            self.start = 0.0
            self.first_step = 0
            self.last_step = 0
            self.stopped_by_budget = False

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.start = time.monotonic()
            self.first_step = self.last_step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.last_step = state.global_step
            if self.budget_s is not None and time.monotonic() - self.start >= self.budget_s:
                self.stopped_by_budget = True
                control.should_training_stop = True
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            # The Trainer has just written checkpoint-<step>: replace its pickles before anything can load them.
            seal_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")
            return control

        def elapsed(self) -> float:
            return time.monotonic() - self.start

    return WindowTrainer, BudgetAndSpeed


def _training_arguments(config: TrainConfig, hp: Hyperparameters, checkpoint_dir: Path) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=hp.micro_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=hp.warmup_steps,
        max_steps=hp.max_steps,
        weight_decay=hp.weight_decay,
        adam_beta1=hp.adam_beta1,
        adam_beta2=hp.adam_beta2,
        adam_epsilon=1e-8,
        max_grad_norm=hp.max_grad_norm,
        optim="adamw_torch",
        logging_steps=config.log_interval,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_interval,
        save_total_limit=2,
        seed=config.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        report_to=[],
        disable_tqdm=False,
    )


def _checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step of a Trainer checkpoint folder (``checkpoint-<step>``)."""
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def _load_finished_checkpoint(trainer: Any, checkpoint: Path) -> None:
    """Take the weights and state of a checkpoint that already reached max_steps, without training.

    Resuming the Trainer there would run one more step, so a rerun would not give the same model.
    """
    from safetensors.torch import load_file
    from transformers import TrainerState

    weights = load_file(str(checkpoint / "model.safetensors"))
    missing, unexpected = trainer.model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if trainer.model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise TrainInputError(f"checkpoint {checkpoint} does not match the model ({missing or unexpected}).")
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


# What each part of the run identity is called in the one-line reason for a restart.
IDENTITY_NAMES = {
    ("model", "tokenizer_sha256"): "the tokenizer",
    ("model", "weights_sha256"): "the model weights",
    ("model", "config_sha256"): "the model's config.json",
    ("data", "domain"): "the domain data",
    ("data", "general"): "the general data",
    ("seed",): "--seed",
}


def changed_inputs(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two run identities, in words (``the tokenizer``, ``--learning-rate`` ...)."""
    names: list[str] = []
    if previous.get("format") != current.get("format"):
        return ["the checkpoints' record (written by an older version of this stage)"]
    for key, name in IDENTITY_NAMES.items():
        old, new = previous, current
        for part in key:
            old, new = (old or {}).get(part), (new or {}).get(part)
        if old != new:
            names.append(name)
    old_hp, new_hp = previous.get("hyperparameters") or {}, current.get("hyperparameters") or {}
    names += [f"--{k.replace('_', '-')}" for k in sorted(set(old_hp) | set(new_hp)) if old_hp.get(k) != new_hp.get(k)]
    return names


def restart_reason(changes: list[str], model_dir: Path) -> str:
    """The one line printed when a rerun trains afresh, naming what changed first."""
    first, rest = changes[0], changes[1:]
    also = f" (and {', '.join(rest)})" if rest else ""
    return f"{first}{also} changed since the checkpoints were written: training afresh from {model_dir}"


def _remove_unfinished_checkpoints(checkpoint_dir: Path) -> None:
    """Delete checkpoint folders whose save never finished (killed mid-save): they are never loaded."""
    for folder in sorted(checkpoint_dir.glob("checkpoint-*")):
        if folder.is_dir() and not is_sealed(folder):
            print(f"removing {folder}: its save did not finish (or an older version wrote it); it is not loaded")
            shutil.rmtree(folder)


def latest_safe_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest finished checkpoint, checked file by file; a tampered or foreign one is refused."""
    folders = [f for f in checkpoint_dir.glob("checkpoint-*") if f.is_dir() and f.name.split("-")[-1].isdigit()]
    if not folders:
        return None
    latest = max(folders, key=_checkpoint_step)
    problem = checkpoint_problem(latest)
    if problem:
        raise TrainInputError(
            f"not resuming: {problem}. This stage loads only checkpoints it wrote itself (no pickle files); "
            f"delete {latest}, or pass --no-resume to start over."
        )
    return latest


def prepare_checkpoint_dir(
    checkpoint_dir: Path, run_identity: dict[str, Any], resume: bool, on_changed: str = "restart",
    model_dir: Path | None = None,
) -> tuple[Path | None, str | None]:
    """Make the checkpoint folder ready: ``(checkpoint to resume from or None, reason for a restart or None)``.

    Checkpoints of other inputs or hyperparameters (all but ``RESUMABLE_CHANGES``) are deleted with a
    one-line reason (``on_changed="restart"``) or refused (``"refuse"``); ``resume=False`` clears a
    folder this stage wrote before. Call with the checkpoint folder's lock held.
    """
    record = checkpoint_dir / RUN_CONFIG
    reason = None
    if checkpoint_dir.exists() and any(checkpoint_dir.iterdir()):
        if not record.is_file():
            raise TrainInputError(
                f"checkpoint folder {checkpoint_dir} holds files not written by `python -m dapt train`; "
                "choose another --checkpoint-dir or --output."
            )
        if not resume:
            shutil.rmtree(checkpoint_dir)
        else:
            previous = json.loads(record.read_text(encoding="utf-8"))
            changes = changed_inputs(previous, run_identity)
            if changes and on_changed == "refuse":
                raise TrainInputError(
                    f"checkpoints in {checkpoint_dir} come from a run with other inputs: {', '.join(changes)} "
                    "changed. Pass --on-changed-inputs restart (or --no-resume) to train afresh, or another --output."
                )
            if changes:
                reason = restart_reason(changes, model_dir or Path("the given model"))
                shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_json(record, run_identity)
    if not resume:
        return None, reason
    _remove_unfinished_checkpoints(checkpoint_dir)
    return latest_safe_checkpoint(checkpoint_dir), reason


def validation_losses(
    model: Any, streams: dict[str, WindowStream], windows: int, batch: int
) -> dict[str, float]:
    """Mean next-token loss (nats) of the first ``windows`` served windows of each validation stream."""
    import torch

    losses = {}
    model.eval()
    with torch.no_grad():
        for name, stream in streams.items():
            total, count = 0.0, 0
            for start in range(0, windows, batch):
                rows = np.stack([stream.window(i) for i in range(start, min(windows, start + batch))])
                tokens = torch.from_numpy(rows)
                logits = model(input_ids=tokens[:, :-1]).logits
                total += float(torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum"))
                count += tokens[:, 1:].numel()
            losses[name] = total / count
    return losses


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, marker=".", label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _data_fingerprint(prefix: Path) -> dict[str, Any]:
    """Content hashes of a dataset: its sidecar (tokenizer, counts) and its training split's index."""
    return {
        "sidecar_sha256": file_sha256(f"{prefix}.dapt.json"),
        "train_idx_sha256": file_sha256(f"{split_prefix(prefix, 'train')}.idx"),
    }


def run_identity(config: TrainConfig, hp: Hyperparameters, model_dir: Path, tokenizer_sha: str,
                 sources: list[tuple[str, Path, float]]) -> dict[str, Any]:
    """What decides the trained model: hyperparameters (all but ``RESUMABLE_CHANGES``), seed, input contents.

    Paths are left out, so the same files reached from another folder or working directory still resume.
    """
    return {
        "format": IDENTITY_FORMAT,
        "hyperparameters": {k: v for k, v in asdict(hp).items() if k not in RESUMABLE_CHANGES},
        "seed": config.seed,
        "model": {"tokenizer_sha256": tokenizer_sha,
                  "config_sha256": file_sha256(model_dir / "config.json"),
                  "weights_sha256": {p.name: file_sha256(p) for p in sorted(model_dir.glob("*.safetensors"))}},
        "data": {name: _data_fingerprint(prefix) for name, prefix, _ in sources},
    }


def remove_stale_output(output: Path, identity: dict[str, Any]) -> bool:
    """Delete an earlier output of this stage trained from other inputs, so none outlives a failed rerun."""
    manifest = read_manifest(output)
    if not manifest or manifest.get("stage") != "train":
        return False
    if (manifest.get("parameters") or {}).get("identity") == identity:
        return False
    with output_lock(output, "train"):
        shutil.rmtree(output)
    return True


def _blend_sources(config: TrainConfig, hp: Hyperparameters) -> list[tuple[str, Path, float]]:
    sources = [("domain", Path(config.data_prefix), 1.0 - hp.general_share)]
    if hp.general_share > 0:
        if config.general_prefix is None:
            raise TrainInputError("--general-share is above 0 but no --general-prefix names general data.")
        sources.append(("general", Path(config.general_prefix), hp.general_share))
    return sources


def train(config: TrainConfig) -> Path:
    """Continue pretraining ``config.model`` on the blended data; write an HF checkpoint folder.

    Returns the output folder. It holds the model weights and config, the input
    model's tokenizer files, ``train_report.json`` (steps, stop reason, throughput,
    validation losses), ``loss_curve.png`` and ``manifest.json``.
    """
    hp = resolve_hyperparameters(config)
    model_dir = Path(config.model)
    tokenizer_sha = check_model_folder(model_dir)
    sources = _blend_sources(config, hp)
    metas = {name: read_data_sidecar(prefix) for name, prefix, _ in sources}

    import torch

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model = load_model(model_dir)
    vocab_rows = model.get_input_embeddings().num_embeddings
    for name, prefix, _ in sources:
        check_data_matches_model(prefix, metas[name], tokenizer_sha, vocab_rows)
    if hp.seq_length > getattr(model.config, "max_position_embeddings", hp.seq_length):
        raise TrainInputError(
            f"--seq-length {hp.seq_length} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}."
        )
    train_streams = [WindowStream(open_split(prefix, "train"), hp.seq_length, config.seed)
                     for _, prefix, _ in sources]
    torch.manual_seed(config.seed)

    output = Path(config.output).absolute()
    checkpoint_dir = Path(config.checkpoint_dir or output.with_name(output.name + "_checkpoints")).absolute()
    identity = run_identity(config, hp, model_dir, tokenizer_sha, sources)
    inputs = {"model": {"path": str(model_dir.absolute()), "stage": (read_manifest(model_dir) or {}).get("stage"),
                        **identity["model"]},
              "data": {name: {"prefix": str(Path(prefix).absolute()), **identity["data"][name]}
                       for name, prefix, _ in sources}}
    with output_lock(checkpoint_dir, "train", leftovers=[f"{checkpoint_dir.name}/.resume-*"]):
        resume_from, reason = prepare_checkpoint_dir(checkpoint_dir, identity, config.resume,
                                                     config.on_changed_inputs, model_dir)
        if remove_stale_output(output, identity):
            reason = (reason or f"{output} was trained from other inputs: training afresh from {model_dir}")
            reason += f"; the stale {output.name}/ was removed"
        if reason:
            print(reason)

        trainer_cls, callback_cls = _trainer_classes()
        budget = callback_cls(config.time_budget_s)
        dataset = _blended_dataset_class()(train_streams, [weight for _, _, weight in sources])
        trainer = trainer_cls(model=model, args=_training_arguments(config, hp, checkpoint_dir),
                              train_dataset=dataset, callbacks=[budget])
        if resume_from is not None and _checkpoint_step(resume_from) >= hp.max_steps:
            _load_finished_checkpoint(trainer, resume_from)
            budget.start = time.monotonic()
            budget.first_step = budget.last_step = trainer.state.global_step
        elif resume_from is not None:
            with materialised(resume_from, checkpoint_dir) as private_copy:
                trainer.train(resume_from_checkpoint=str(private_copy))
        else:
            trainer.train()
        elapsed = budget.elapsed()
        steps_now = budget.last_step - budget.first_step
        state = trainer.state
        output = _finish(config, hp, trainer, sources, model_dir, output, identity, inputs, {
            "steps": state.global_step,
            "steps_this_session": steps_now,
            "resumed_from": str(resume_from) if resume_from else None,
            "restarted_because": reason,
            "stopped_by": "time_budget" if budget.stopped_by_budget else "max_steps",
            "tokens_seen": state.global_step * hp.tokens_per_step,
            "train_seconds_this_session": round(elapsed, 2),
            "tokens_per_second": round(steps_now * hp.tokens_per_step / elapsed, 1) if elapsed > 0 else None,
        })
    return output


def _finish(config: TrainConfig, hp: Hyperparameters, trainer: Any, sources: list[tuple[str, Path, float]],
            model_dir: Path, output: Path, identity: dict[str, Any], inputs: dict[str, Any],
            report: dict[str, Any]) -> Path:
    """Score the validation splits and write the output folder (model, tokenizer, report, loss plot)."""
    import torch

    state = trainer.state
    val_streams = {}
    if config.validation_windows > 0:
        for name, prefix, _ in sources:
            if Path(f"{split_prefix(prefix, 'validation')}.idx").is_file():
                val_streams[name] = WindowStream(open_split(prefix, "validation"), hp.seq_length, config.seed)
    val = validation_losses(trainer.model, val_streams, config.validation_windows, hp.micro_batch_size)

    report = {
        **report,
        "final_loss": next((e["loss"] for e in reversed(state.log_history) if "loss" in e), None),
        "validation_loss_nats": val,
        "validation_bits_per_token": {k: v / math.log(2) for k, v in val.items()},
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "hyperparameters": {**asdict(hp), "gradient_accumulation_steps": hp.gradient_accumulation_steps},
        "log_history": state.log_history,
    }
    parameters = {**asdict(config), "resolved": asdict(hp), "identity": identity}
    with stage_output(output, "train", parameters, inputs) as tmp:
        trainer.model.save_pretrained(str(tmp), safe_serialization=True)
        copy_tokenizer_files(model_dir, tmp)
        write_json(tmp / "train_report.json", report)
        plot_loss_curve(state.log_history, tmp / "loss_curve.png",
                        f"CPU DAPT, general share {hp.general_share:g}, lr {hp.learning_rate:g}")
    print(f"trained {state.global_step} steps ({report['stopped_by']}), "
          f"{report['tokens_per_second']} tokens/s; model written to {output}")
    return output
