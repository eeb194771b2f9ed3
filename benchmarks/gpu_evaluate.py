"""GPU evaluation throughput: evaluate's scoring path against a plain model(input_ids) loop (issue 13).

One run on one GPU, on a RANDOMLY INITIALISED model with Llama-2-7B's shapes (hidden 4096, 32 layers, 32
heads, MLP 11008, vocabulary 32000, 4096 positions; nothing is read from a hub), in the precision
``dapt.evaluate.choose_placement`` picks there (bf16 where the GPU supports it). Documents of random token
ids (lengths drawn around 3,000 tokens, so there are full and partial windows) are cut into windows exactly
as ``evaluate`` cuts held-out text. Then, alternating, ``--repeats`` times each:

- evaluate: ``dapt.evaluate.score_windows`` with evaluate's CUDA batching (16,384 padded tokens per
  forward pass), input building, host-to-device copies, the loss and its synchronisation included;
- plain: ``model(input_ids=batch)`` over the same batches, already padded and on the GPU, one
  synchronisation at the end: the yardstick.

It prints (and with ``--output`` writes) one JSON record: tokens per second of each (median and all runs),
their ratio (goal: evaluate >= 90% of plain), peak GPU memory of each, the GPU and the library versions.

    PYTHONPATH=code python benchmarks/gpu_evaluate.py                 # a CUDA machine (about 2-4 minutes)
    PYTHONPATH=code python benchmarks/gpu_evaluate.py --self-test-cpu # anywhere: a tiny shape on CPU, float32

``--self-test-cpu`` runs the same code on a 2-layer model on CPU (no figure of interest; it proves the
script works before it travels to a GPU machine).

On a GPU machine without a package registry (PyTorch with CUDA installed, nothing else): what the script
needs beyond PyTorch is transformers and the libraries it loads (tokenizers, safetensors, huggingface-hub,
accelerate ...), all listed with versions in ``benchmarks/gpu_evaluate_requirements.txt``, plus this
repository's ``code/dapt`` (pure Python: it needs only tqdm beyond the standard library). Fetch the wheels
where a registry is reachable, for the GPU machine's Python version, and carry the folder with the repository:

    pip download --no-deps --only-binary=:all: --python-version 3.10 --platform manylinux2014_x86_64 \\
        -d gpu_wheels -r benchmarks/gpu_evaluate_requirements.txt
    # on the GPU machine (a venv that sees its PyTorch: python -m venv --system-site-packages .venv-gpu):
    pip install --no-index --no-deps --find-links gpu_wheels -r benchmarks/gpu_evaluate_requirements.txt
    PYTHONPATH=code python benchmarks/gpu_evaluate.py --output gpu_evaluate.json

(17 wheels, about 40 MB for Python 3.10, 3.11 or 3.12; PyTorch itself is not among them. Checked here: a
venv holding only PyTorch ran ``--self-test-cpu`` after installing them with ``--no-index``.)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 256}
GOAL = 0.90


def random_model(shape: dict[str, int], device: str, dtype: Any) -> Any:
    """A Llama with ``shape`` and random weights, built directly on ``device`` in ``dtype`` (SDPA attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, rms_norm_eps=1e-5, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def random_windows(total_tokens: int, max_length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Windows of random documents (``[BOS] + ids``), cut as evaluate cuts held-out text."""
    import numpy as np

    from dapt.evaluate import _windows

    rng = np.random.default_rng(seed)
    windows: list[list[int]] = []
    tokens = 0
    while tokens < total_tokens:
        length = int(min(4 * max_length, max(16, rng.lognormal(np.log(0.75 * max_length), 0.8))))
        ids = [1] + rng.integers(3, vocab, size=length).tolist()
        windows.extend(_windows(ids, max_length))
        tokens += length
    return sorted(windows, key=len, reverse=True)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def time_evaluate(model: Any, windows: list[list[int]], batch_tokens: int, device: str) -> tuple[float, float | None]:
    """Seconds and peak GPU memory of evaluate's scoring over ``windows``."""
    from dapt.evaluate import score_windows

    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    score_windows(model, windows, max_rows=None, max_tokens=batch_tokens)
    _sync(device)
    return time.perf_counter() - start, _peak_gib(device)


def padded_batches(windows: list[list[int]], batch_tokens: int, device: str) -> list[Any]:
    """The batches evaluate forms, as padded id tensors already on ``device``."""
    import torch

    from dapt.evaluate import batches

    out = []
    for batch in batches(windows, None, batch_tokens):
        rows = torch.zeros((len(batch), len(batch[0])), dtype=torch.long)
        for row, window in enumerate(batch):
            rows[row, :len(window)] = torch.tensor(window)
        out.append(rows.to(device))
    return out


def time_plain(model: Any, inputs: list[Any], device: str) -> tuple[float, float | None]:
    """Seconds and peak GPU memory of a bare ``model(input_ids)`` loop over ``inputs``."""
    import torch

    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for input_ids in inputs:
            model(input_ids=input_ids)
    _sync(device)
    return time.perf_counter() - start, _peak_gib(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model and windows, time both paths alternately, and return the record."""
    import torch
    import transformers

    from dapt.evaluate import CUDA_BATCH_TOKENS, choose_placement

    if args.self_test_cpu:
        shape, placement = TINY, choose_placement("cpu", "auto", cuda_gpus=0, bf16_supported=False)
        total_tokens, batch_tokens = args.tokens or 20_000, args.batch_tokens or 2048
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible: run on a GPU machine, or pass --self-test-cpu to check the script")
        shape = LLAMA2_7B
        placement = choose_placement("auto", "auto", cuda_gpus=1, bf16_supported=torch.cuda.is_bf16_supported())
        total_tokens, batch_tokens = args.tokens or 400_000, args.batch_tokens or CUDA_BATCH_TOKENS
    device, dtype = placement.device, getattr(torch, placement.dtype)
    started = time.perf_counter()
    model = random_model(shape, device, dtype)
    build_seconds = time.perf_counter() - started
    windows = random_windows(total_tokens, shape["max_position_embeddings"], shape["vocab_size"])
    scored = sum(len(w) - 1 for w in windows)
    inputs = padded_batches(windows, batch_tokens, device)
    weights_gib = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2)

    warm = windows[: max(1, len(inputs[0]))]  # one batch each: kernels chosen, memory pools warm
    time_evaluate(model, warm, batch_tokens, device)
    time_plain(model, inputs[:1], device)
    evaluate_runs, plain_runs, peaks = [], [], {"evaluate": 0.0, "plain": 0.0}
    for _ in range(args.repeats):
        seconds, peak = time_evaluate(model, windows, batch_tokens, device)
        evaluate_runs.append(scored / seconds)
        peaks["evaluate"] = max(peaks["evaluate"], peak or 0.0)
        seconds, peak = time_plain(model, inputs, device)
        plain_runs.append(scored / seconds)
        peaks["plain"] = max(peaks["plain"], peak or 0.0)
    ratio = statistics.median(evaluate_runs) / statistics.median(plain_runs)
    return {
        "bench": "gpu_evaluate",
        "mode": "self-test-cpu (tiny shape; no figure of interest)" if args.self_test_cpu else "llama2-7b shapes",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "dtype": placement.dtype,
        "placement": placement.reason,
        "shape": shape,
        "weights_gib": weights_gib,
        "model_build_seconds": round(build_seconds, 1),
        "windows": len(windows),
        "scored_tokens": scored,
        "batches": len(inputs),
        "batch_tokens": batch_tokens,
        "evaluate_tokens_per_second": round(statistics.median(evaluate_runs), 1),
        "plain_tokens_per_second": round(statistics.median(plain_runs), 1),
        "evaluate_runs": [round(v, 1) for v in evaluate_runs],
        "plain_runs": [round(v, 1) for v in plain_runs],
        "ratio": round(ratio, 4),
        "goal": GOAL,
        "passed": None if args.self_test_cpu else ratio >= GOAL,
        "peak_gpu_memory_gib": peaks if device == "cuda" else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "cuda": torch.version.cuda if device == "cuda" else None},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--self-test-cpu", action="store_true", help="tiny shape on CPU, float32 (checks the script)")
    parser.add_argument("--tokens", type=int, default=None, help="scored tokens per pass (GPU: 400,000; CPU: 20,000)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each path, alternating")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON record here")
    args = parser.parse_args()
    record = run(args)
    text = json.dumps(record, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
