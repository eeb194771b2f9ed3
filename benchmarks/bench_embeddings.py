"""Benchmarks of the embeddings stage; prints one JSON object.

1. ``synthetic``: a checkpoint with Llama-2-7B's embedding shapes (32,000 x 4,096 bf16 input and output
   matrices in two shards, the other tensors small) extended by about 4,000 domain tokens plus padding to a
   multiple of 1,024 (128 x TP 8). The extension runs in a child process that reports its own peak resident
   memory (``VmHWM`` from /proc/self/status) and wall time. Targets: under 1.5 GB and under 30 s.
2. ``stories``: stories260K (converted from llama2.c, tokenizer made lossless) extended with about 500
   frequent domain words from ../shared/data/domain; held-out domain bits per byte BEFORE any training for
   each initialisation (mean against random input rows; tied, and untied with zero output rows).

Usage: ``python benchmarks/bench_embeddings.py [--only synthetic|stories] [--workdir DIR]``.
Needs ../shared (the Llama 2 tokenizer, stories260K, the domain corpus); parts without it are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "tests"))

from adapted_tokenizer_fixture import build_adapted_tokenizer, frequent_word_pieces  # noqa: E402

CHILD = """
import json, resource, sys, time
from dapt.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
# VmHWM: this process's own peak RSS. ru_maxrss is not used: Linux carries the parent's peak across exec.
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print("BENCH " + json.dumps({"exit": code, "seconds": seconds, "peak_rss_mib": int(status) / 1024}))
"""

def domain_texts(limit_bytes: int | None = None) -> list[str]:
    texts, total = [], 0
    for path in sorted((SHARED / "data" / "domain").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(json.loads(line)["text"])
                total += len(texts[-1])
                if limit_bytes and total > limit_bytes:
                    return texts
    return texts


def run_stage(args: list[str]) -> dict:
    """Run ``python -m dapt`` in a child process; return its exit code, wall time and peak RSS."""
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"stage failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    result = json.loads(line[6:])
    if result["exit"] != 0:
        raise RuntimeError(f"stage exited {result['exit']}:\n{done.stderr[-2000:]}")
    return result


def write_synthetic_checkpoint(folder: Path, tokenizer: Path, vocab: int = 32000, dim: int = 4096) -> None:
    """Two bf16 shards: embed_tokens + small layer tensors, then lm_head + small tensors, with an index."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) * 0.02).to(torch.bfloat16)

    small = {f"model.layers.0.{n}.weight": matrix(64, dim) for n in ("self_attn.q_proj", "mlp.up_proj")}
    shards = {
        "model-00001-of-00002.safetensors": {"model.embed_tokens.weight": matrix(vocab, dim), **small},
        "model-00002-of-00002.safetensors": {
            "lm_head.weight": matrix(vocab, dim),
            "model.norm.weight": torch.ones(dim, dtype=torch.bfloat16),
        },
    }
    weight_map, total = {}, 0
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": dim,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(tokenizer, folder / "tokenizer.model")


def bench_synthetic(work: Path) -> dict:
    llama_tok = SHARED / "models" / "llama2-tokenizer" / "tokenizer.model"
    if not llama_tok.is_file():
        return {"skipped": f"{llama_tok} is absent"}
    base = work / "synthetic_base"
    shutil.rmtree(base, ignore_errors=True)
    write_synthetic_checkpoint(base, llama_tok)
    pieces = frequent_word_pieces(llama_tok, domain_texts(), 4000)
    build_adapted_tokenizer(llama_tok, pieces, work / "synthetic_tok", multiple=1024)
    result = run_stage(
        [
            "embeddings",
            "--base-model",
            str(base),
            "--tokenizer",
            str(work / "synthetic_tok"),
            "--output",
            str(work / "synthetic_out"),
            "--no-sanity-check",
        ]
    )
    report = json.loads((work / "synthetic_out" / "report.json").read_text())
    return {
        "embedding_shape_before": [32000, 4096],
        "dtype": "bf16",
        "shards": 2,
        "vocab_after": report["vocab_size"],
        "domain_tokens": report["domain_tokens"],
        "reserved_tokens": report["reserved_tokens"],
        "peak_rss_mib": round(result["peak_rss_mib"], 1),
        "wall_seconds": round(result["seconds"], 2),
        "target": "peak RSS < 1536 MiB, wall < 30 s",
        "meets_target": result["peak_rss_mib"] < 1536 and result["seconds"] < 30,
    }


def bench_stories(work: Path) -> dict:
    import sentencepiece as spm
    from transformers import LlamaForCausalLM

    from dapt.basemodel import BaseModelConfig, build_base_model
    from dapt.corpus import iter_documents
    from dapt.embeddings import EmbeddingsConfig, extend_embeddings
    from dapt.evaluate import bits_per_byte

    stories = SHARED / "models" / "stories260K"
    heldout = SHARED / "data" / "heldout" / "domain_heldout.jsonl"
    if not (stories / "stories260K.bin").is_file() or not heldout.is_file():
        return {"skipped": "../shared stories260K or held-out data is absent"}
    base = build_base_model(
        BaseModelConfig(
            output=work / "stories",
            llama2c_checkpoint=stories / "stories260K.bin",
            llama2c_tokenizer=stories / "tok512.model",
        )
    )
    pieces = frequent_word_pieces(base / "tokenizer.model", domain_texts(), 500)
    tok = build_adapted_tokenizer(base / "tokenizer.model", pieces, work / "stories_tok")
    texts = [doc.text for doc in iter_documents(heldout)]
    variants = {
        "tied, mean input rows": {"output_init": "mean"},
        "tied, random input rows": {"output_init": "mean", "input_init": "random"},
        "untied, mean input rows, zero output rows": {"untie_embeddings": True},
        "untied, random input rows, zero output rows": {"untie_embeddings": True, "input_init": "random"},
    }

    def score(folder: Path, tokenizer: Path) -> float:
        model = LlamaForCausalLM.from_pretrained(str(folder)).float().eval()
        return round(bits_per_byte(model, spm.SentencePieceProcessor(model_file=str(tokenizer)), texts), 4)

    start = time.perf_counter()
    results = {"base model, tok512 (lossless)": score(base, base / "tokenizer.model")}
    for i, (label, options) in enumerate(variants.items()):
        out = work / f"stories_ext_{i}"
        extend_embeddings(
            EmbeddingsConfig(base_model=base, tokenizer=tok, output=out, sanity_check=False, **options)
        )
        results[label] = score(out, out / "tokenizer.model")
    return {
        "heldout": str(heldout),
        "documents": len(texts),
        "domain_tokens_added": len(pieces),
        "vocab_after": json.loads((work / "stories_ext_0" / "report.json").read_text())["vocab_size"],
        "domain_heldout_bits_per_byte_before_training": results,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["synthetic", "stories"])
    parser.add_argument("--workdir", type=Path, help="keep the artifacts here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_embeddings_") as tmp:
        work = args.workdir or Path(tmp)
        results = {}
        with contextlib.redirect_stdout(sys.stderr):  # stage messages go to stderr, the result to stdout
            if args.only in (None, "synthetic"):
                results["synthetic"] = bench_synthetic(work)
            if args.only in (None, "stories"):
                results["stories"] = bench_stories(work)
    print(json.dumps({"benchmark": "embeddings", **results}, indent=2))


if __name__ == "__main__":
    main()
