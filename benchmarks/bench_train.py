"""CPU DAPT on stories260K: the issue's must-show measurement, end to end, in one command.

    .venv/bin/python benchmarks/bench_train.py                 # full: two 7-minute runs (about 20 minutes)
    .venv/bin/python benchmarks/bench_train.py --budget-s 60   # shorter, for development

Pipeline (every step through the project's own stages): llama2.c stories260K -> HF (`base-model`), an adapted
tokenizer (tok512 + frequent domain words, 1024 pieces), embeddings extended with mean-initialised rows
(`embeddings`), Megatron data from ../shared/data (`data`), then two `train` runs of ``--budget-s`` seconds
each (domain only; 10% general replay) at batch 8 x 512, LR 1e-3, 20 warmup steps, checkpoints every 50 steps
and progress bars on, and `evaluate` on ../shared/data/heldout. Prints a JSON record and a markdown table and
checks the targets: domain held-out <= 2.35 bits/byte, general held-out <= 2.95 with replay, >= 8k tokens/s.

The CPU must be otherwise idle for the throughput figure to mean anything: the load average before and after
each run is recorded next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
DATA = SHARED / "data"
RUNS = {"domain_only": ("DAPT, no replay", 0.0), "replay10": ("DAPT, 10% replay", 0.1)}
TARGETS = {"domain_bpb_max": 2.35, "general_bpb_with_replay_max": 2.95, "tokens_per_second_min": 8000}


def adapted_tokenizer(base_model: Path, out: Path, added: int) -> Path:
    """The adapted tokenizer, built by the tokenizer stage: tok512 (lossless) + guided-bpe domain tokens.

    Padded to a multiple of 128 (max TP 1): the tiny model needs no tensor-parallel padding.
    """
    from dapt.tokenizer import TokenizerConfig, adapt_tokenizer

    return adapt_tokenizer(TokenizerConfig(
        base_tokenizer=base_model, domain_data=DATA / "domain", general_data=DATA / "general", output=out,
        domain_vocab_size=4000, max_added_tokens=added, max_tensor_parallel=1,
        heldout_domain=DATA / "heldout" / "domain_heldout.jsonl",
        heldout_general=DATA / "heldout" / "general_heldout.jsonl",
    ))


def prepare(work: Path, added: int) -> dict[str, Path]:
    """Base model, adapted tokenizer, extended model and Megatron data (reused when already built)."""
    from dapt.basemodel import BaseModelConfig, build_base_model
    from dapt.embeddings import EmbeddingsConfig, extend_embeddings
    from dapt.megatron_data import DataConfig, build_megatron_data

    paths = {"base": work / "base_model", "tokenizer": work / "tokenizer",
             "extended": work / "extended_model",
             "domain": work / "megatron_data" / "domain", "general": work / "megatron_data" / "general"}
    if not (paths["base"] / "manifest.json").is_file():
        build_base_model(BaseModelConfig(output=paths["base"], llama2c_checkpoint=STORIES / "stories260K.bin",
                                         llama2c_tokenizer=STORIES / "tok512.model"))
    if not (paths["tokenizer"] / "manifest.json").is_file():
        adapted_tokenizer(paths["base"], paths["tokenizer"], added)
    if not (paths["extended"] / "manifest.json").is_file():
        extend_embeddings(EmbeddingsConfig(base_model=paths["base"], tokenizer=paths["tokenizer"],
                                           output=paths["extended"], input_init="mean", output_init="mean",
                                           vocab_multiple=128,
                                           sanity_check=False))
    for name in ("domain", "general"):
        if not Path(f"{paths[name]}.dapt.json").is_file():
            build_megatron_data(DataConfig(tokenizer=paths["tokenizer"], input=DATA / name,
                                           output_prefix=paths[name], split_percent=(98.0, 1.0, 1.0)))
    return paths


def plain_loop_tokens_per_second(model_dir: Path, steps: int, seq_length: int = 512, batch: int = 8) -> float:
    """Throughput of a bare PyTorch loop (forward, backward, clipping, AdamW) on the same model and batch.

    Measured in the same process and conditions as the Trainer runs, as the yardstick for engine overhead.
    """
    import torch

    from dapt.cpu_train import load_model

    model = load_model(model_dir).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    vocab = model.get_input_embeddings().num_embeddings
    tokens = torch.randint(0, vocab, (batch, seq_length + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * seq_length / (time.perf_counter() - start)


def run_training(
    paths: dict[str, Path], work: Path, name: str, share: float, args: argparse.Namespace
) -> dict:
    """One time-budgeted training run from scratch; returns its train_report plus the load around it."""
    from dapt.cpu_train import TrainConfig, train

    load_before = os.getloadavg()
    output = train(TrainConfig(
        model=paths["extended"], data_prefix=paths["domain"], general_prefix=paths["general"],
        output=work / name, profile="tiny", general_share=share, seq_length=512, micro_batch_size=8,
        global_batch_size=8, learning_rate=args.lr, warmup_steps=20,
        max_steps=args.max_steps or 1_000_000, time_budget_s=None if args.max_steps else args.budget_s,
        save_interval=50, log_interval=10, threads=args.threads, seed=args.seed, resume=False,
    ))
    report = json.loads((output / "train_report.json").read_text(encoding="utf-8"))
    report.pop("log_history")
    return {**report, "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "output": str(output)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench_train")
    parser.add_argument("--budget-s", type=float, default=420.0, help="training seconds per run (7 min)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="run this many steps instead of a time budget (quality at a fixed amount of "
                             "training, e.g. 850 = 7 minutes at 8.5k tokens/s, when the CPU is busy)")
    parser.add_argument("--baseline-steps", type=int, default=10, help="steps of the plain-loop yardstick")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS),
                        help="training runs: without replay, with 10%% general replay")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--added-tokens", type=int, default=512)
    parser.add_argument("--max-documents", type=int, default=None, help="held-out documents per set")
    parser.add_argument("--lm-eval-tasks", nargs="+", default=["none"],
                        help="lm-eval tasks in the evaluation (e.g. dapt_nextline_domain dapt_nextline_general)")
    args = parser.parse_args()
    if not STORIES.is_dir() or not DATA.is_dir():
        print(json.dumps({"skipped": f"{SHARED} (stories260K and the corpora) is absent"}))
        return 0

    import torch

    from dapt.evaluate import EvaluateConfig, evaluate

    torch.set_num_threads(args.threads)
    started = time.time()
    paths = prepare(args.work, args.added_tokens)
    baseline = plain_loop_tokens_per_second(paths["extended"], args.baseline_steps)
    runs = {name: run_training(paths, args.work, f"dapt_{name}", RUNS[name][1], args) for name in args.runs}
    evaluate(EvaluateConfig(
        models=(paths["base"], paths["extended"], *(args.work / f"dapt_{name}" for name in args.runs)),
        labels=("base (tok512)", "extended, before training", *(RUNS[name][0] for name in args.runs)),
        domain_heldout=DATA / "heldout" / "domain_heldout.jsonl",
        general_heldout=DATA / "heldout" / "general_heldout.jsonl",
        output=args.work / "evaluation", max_documents=args.max_documents, threads=args.threads,
        lm_eval_tasks=tuple(args.lm_eval_tasks),
    ))
    results = json.loads((args.work / "evaluation" / "results.json").read_text(encoding="utf-8"))["results"]
    bpb = {row["label"]: {k: round(row[k]["bits_per_byte"], 3) for k in ("domain", "general")}
           for row in results}
    speeds = [run["tokens_per_second"] for run in runs.values()]
    checks = {f"domain_bpb_{name}": bpb[RUNS[name][0]]["domain"] <= TARGETS["domain_bpb_max"]
              for name in args.runs}
    if "replay10" in args.runs:
        checks["general_bpb_replay10"] = (
            bpb[RUNS["replay10"][0]]["general"] <= TARGETS["general_bpb_with_replay_max"])
    checks["tokens_per_second"] = min(speeds) >= TARGETS["tokens_per_second_min"]
    if args.max_steps:
        checks = {k: v for k, v in checks.items() if k != "tokens_per_second"}  # speed needs the timed runs
    record = {"bench": "train", "budget_s": None if args.max_steps else args.budget_s,
              "max_steps": args.max_steps, "plain_loop_tokens_per_second_before": round(baseline),
              "plain_loop_tokens_per_second_after": round(
                  plain_loop_tokens_per_second(paths["extended"], args.baseline_steps)),
              "lr": args.lr, "threads": args.threads,
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "bits_per_byte": bpb, "runs": runs,
              "targets": TARGETS, "passed": checks, "total_seconds": round(time.time() - started, 1)}
    print(json.dumps(record, indent=2))
    print((args.work / "evaluation" / "results.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
