"""Benchmarks of the embeddings stage; prints one JSON object.

1. ``synthetic``: a checkpoint with Llama-2-7B's embedding shapes (32,000 x 4,096 bf16 input and output
   matrices in two shards, the other tensors small) extended by about 4,000 domain tokens plus padding to a
   multiple of 1,024 (128 x TP 8). The extension runs in a child process that reports its own peak resident
   memory (``VmHWM`` from /proc/self/status) and wall time. Targets: under 1.5 GB and under 30 s.
2. ``stories``: stories260K (converted from llama2.c, tokenizer made lossless) extended with about 500
   frequent domain words from ../shared/data/domain; held-out domain bits per byte BEFORE any training for
   each initialisation (mean against random input rows; tied, and untied with zero output rows).
3. ``decompose``: why the tiny profile's extended model scores better than its base model before any
   training. Reads ``outputs/tiny/base_model`` and ``outputs/tiny/extended_model`` (run notebook 1 on the
   tiny profile first, or pass ``--run-dir``) and the embedded held-out sets; for each set: the evaluation's
   own bits per byte (``dapt.evaluate.score_texts``, reproduced here token by token), the extended model on
   the base model's tokens, the NLL split between target positions that are new tokens and old tokens (with
   the base model's bits on the same bytes), logit statistics, and the score for other constant logits of
   the new tokens (-inf, -8 ... +2, and the mean base logit, which output rows equal to the mean of all base
   output rows would give).

Usage: ``python benchmarks/bench_embeddings.py [--only synthetic|stories|decompose] [--workdir DIR]
[--run-dir DIR]``. Parts 1 and 2 need ../shared (the Llama 2 tokenizer, stories260K, the domain corpus);
parts without their inputs are skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


# --- decompose: the extended model before training, position by position --------------------------

SWEEP = (float("-inf"), -8.0, -4.0, -2.0, 0.0, 2.0, "mean base logit")


def _per_token(model: Any, sp: Any, text: str, base_vocab: int) -> dict[str, Any]:
    """Every scored token of ``text`` (the evaluation's windows): NLL in bits, byte span, logit statistics.

    ``sweep[c]``: the NLL in bits had every new token's logit been ``c`` instead of what the model gives.
    """
    import numpy as np
    import torch

    from dapt.evaluate import _windows

    pieces = sp.encode(text, out_type="immutable_proto").pieces
    ids = [sp.bos_id()] + [p.id for p in pieces]
    parts: dict[str, list] = {"nll": [], "lse_base": [], "mean_base": [], "negative": [], "new_mass": []}
    sweep: dict[Any, list] = {c: [] for c in SWEEP}
    with torch.no_grad():
        for window in _windows(ids, int(model.config.max_position_embeddings)):
            logits = model(input_ids=torch.tensor([window])).logits[0, :-1].double()
            target = torch.tensor(window[1:])[:, None]
            base = logits[:, :base_vocab]
            parts["nll"].append((torch.logsumexp(logits, -1) - logits.gather(1, target)[:, 0]).numpy())
            parts["lse_base"].append(torch.logsumexp(base, -1).numpy())
            parts["mean_base"].append(base.mean(-1).numpy())
            parts["negative"].append((base < 0).double().mean(-1).numpy())
            if logits.shape[1] == base_vocab:
                continue
            parts["new_mass"].append(torch.softmax(logits, -1)[:, base_vocab:].sum(-1).numpy())
            for c in SWEEP:
                changed = logits.clone()
                changed[:, base_vocab:] = base.mean(-1, keepdim=True) if isinstance(c, str) else c
                sweep[c].append((torch.logsumexp(changed, -1) - changed.gather(1, target)[:, 0]).numpy())
    ln2 = math.log(2)
    out = {k: np.concatenate(v) / (ln2 if k == "nll" else 1.0) for k, v in parts.items() if v}
    out["sweep"] = {c: np.concatenate(v) / ln2 for c, v in sweep.items() if v}
    out["ids"], out["spans"] = np.array(ids[1:]), [(p.begin, p.end) for p in pieces]
    return out


def _bits_per_byte_of_text(scored: dict[str, Any], size: int) -> Any:
    """Each byte's share of the bits: a token's NLL spread evenly over the bytes it covers."""
    import numpy as np

    per_byte = np.zeros(size)
    for bits, (begin, end) in zip(scored["nll"], scored["spans"], strict=True):
        if end > begin:
            per_byte[begin:end] += bits / (end - begin)
        else:  # a byte-fallback piece after the first of its character
            per_byte[min(begin, size - 1)] += bits
    return per_byte


def decompose_heldout(run_dir: Path, heldout: Path) -> dict:
    """The base and extended models of ``run_dir`` on one held-out set, split as the module docstring says."""
    import numpy as np

    from dapt.corpus import load_corpus
    from dapt.evaluate import load_model_and_tokenizer, score_texts

    texts = [d.text for d in load_corpus(heldout, heldout.name).documents if d.text]
    base, base_sp = load_model_and_tokenizer(run_dir / "base_model")
    extended, adapted_sp = load_model_and_tokenizer(run_dir / "extended_model")
    vocab = base_sp.get_piece_size()
    totals: dict[str, float] = {}
    stats: dict[str, list] = {"lse_base": [], "mean_base": [], "negative": [], "new_mass": []}

    def add(key: str, value: float) -> None:
        totals[key] = totals.get(key, 0.0) + float(value)

    for text in texts:
        size = len(text.encode("utf-8"))
        add("bytes", size)
        on_base = _per_token(base, base_sp, text, vocab)
        on_adapted = _per_token(extended, adapted_sp, text, vocab)
        ext_on_base = _per_token(extended, base_sp, text, vocab)
        add("base_bits", on_base["nll"].sum())
        add("base_tokens", len(on_base["nll"]))
        add("extended_bits", on_adapted["nll"].sum())
        add("extended_on_base_tokens_bits", ext_on_base["nll"].sum())
        base_per_byte = _bits_per_byte_of_text(on_base, size)
        base_tokens_per_byte = _bits_per_byte_of_text({**on_base, "nll": np.ones(len(on_base["nll"]))}, size)
        new = on_adapted["ids"] >= vocab
        for is_new, bits, (begin, end) in zip(new, on_adapted["nll"], on_adapted["spans"], strict=True):
            kind = "new" if is_new else "old"
            add(f"{kind}_tokens", 1)
            add(f"{kind}_bits", bits)
            add(f"{kind}_bytes", end - begin)
            add(f"{kind}_base_bits", base_per_byte[begin:end].sum())
            add(f"{kind}_base_tokens", base_tokens_per_byte[begin:end].sum())
        for c, bits in on_adapted["sweep"].items():
            add(f"sweep adapted {c}", bits[~new].sum() + (bits[new].sum() if new.any() else 0.0))
            add(f"sweep adapted {c} old only", bits[~new].sum())
        for c, bits in ext_on_base["sweep"].items():
            add(f"sweep base {c}", bits.sum())
        for key in ("lse_base", "mean_base", "negative"):
            stats[key].append(on_base[key])
        stats["new_mass"].append(on_adapted["new_mass"])
    reference = {
        "base": score_texts(base, base_sp, texts).bits_per_byte,
        "extended": score_texts(extended, adapted_sp, texts).bits_per_byte,
    }
    size = totals["bytes"]
    if abs(totals["base_bits"] / size - reference["base"]) > 1e-6 or abs(
        totals["extended_bits"] / size - reference["extended"]
    ) > 1e-6:
        raise RuntimeError(f"token-by-token totals {totals} do not reproduce dapt.evaluate's {reference}")
    mean = {key: float(np.concatenate(values).mean()) for key, values in stats.items()}
    split = {}
    for kind in ("new", "old"):
        split[f"{kind}-token positions"] = {
            "tokens": int(totals[f"{kind}_tokens"]),
            "bytes": int(totals[f"{kind}_bytes"]),
            "extended_bits": round(totals[f"{kind}_bits"]),
            "extended_bits_per_token": round(totals[f"{kind}_bits"] / max(totals[f"{kind}_tokens"], 1), 3),
            "base_bits_on_the_same_bytes": round(totals[f"{kind}_base_bits"]),
            "base_tokens_on_the_same_bytes": round(totals[f"{kind}_base_tokens"]),
        }

    def sweep_value(key: str) -> float | str:
        value = totals[key] / size
        return round(value, 4) if math.isfinite(value) else "inf (new tokens impossible)"

    return {
        "heldout": str(heldout),
        "documents": len(texts),
        "bytes": int(size),
        "bits_per_byte": {
            "base model, base tokens (dapt.evaluate)": round(reference["base"], 4),
            "extended model, adapted tokens (dapt.evaluate)": round(reference["extended"], 4),
            "extended model, base tokens": round(totals["extended_on_base_tokens_bits"] / size, 4),
        },
        "tokens": {"base": int(totals["base_tokens"]), "adapted": int(totals["new_tokens"] + totals["old_tokens"])},
        "split_by_target": split,
        "logits": {
            "mean logsumexp of base logits (nats)": round(mean["lse_base"], 3),
            "mean base logit": round(mean["mean_base"], 3),
            "share of base logits below 0": round(mean["negative"], 4),
            "mean probability mass of the new tokens (adapted tokens)": round(mean["new_mass"], 4),
            "share of adapted tokens that are new": round(
                totals["new_tokens"] / (totals["new_tokens"] + totals["old_tokens"]), 4
            ),
        },
        "bits_per_byte_if_every_new_token_had_logit": {
            str(c): {
                "adapted tokens": sweep_value(f"sweep adapted {c}"),
                "adapted tokens, old-token positions only": round(totals[f"sweep adapted {c} old only"] / size, 4),
                "base tokens": sweep_value(f"sweep base {c}"),
            }
            for c in SWEEP
        },
    }


def bench_decompose(run_dir: Path) -> dict:
    from dapt.corpus import DEFAULT_HELDOUT

    missing = [p for p in (run_dir / "base_model", run_dir / "extended_model") if not p.is_dir()]
    if missing:
        return {"skipped": f"{', '.join(map(str, missing))} absent: run code/custom_tokenization.ipynb (tiny) first"}
    start = time.perf_counter()
    result = {kind: decompose_heldout(run_dir, DEFAULT_HELDOUT / kind) for kind in ("domain", "general")}
    return {"run_dir": str(run_dir), **result, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["synthetic", "stories", "decompose"])
    parser.add_argument("--workdir", type=Path, help="keep the artifacts here (default: a temporary folder)")
    parser.add_argument("--run-dir", type=Path, default=REPO / "outputs" / "tiny",
                        help="decompose: the folder holding base_model/ and extended_model/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_embeddings_") as tmp:
        work = args.workdir or Path(tmp)
        results = {}
        with contextlib.redirect_stdout(sys.stderr):  # stage messages go to stderr, the result to stdout
            if args.only in (None, "synthetic"):
                results["synthetic"] = bench_synthetic(work)
            if args.only in (None, "stories"):
                results["stories"] = bench_stories(work)
            if args.only in (None, "decompose"):
                results["decompose"] = bench_decompose(args.run_dir)
    print(json.dumps({"benchmark": "embeddings", **results}, indent=2))


if __name__ == "__main__":
    main()
