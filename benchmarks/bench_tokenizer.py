"""Tokenizer-stage benchmark: per-stage timings on ../shared/data, worker scaling, and a scale run.

    python benchmarks/bench_tokenizer.py [--only stages scale] [--workers 1 2] [--repeat 3]
                                         [--sizes-mb 100 300 1000] [--output outputs/benchmarks/tokenizer.json]

``stages``: the whole adaptation (Llama 2 tokenizer, the full-size profiles' domain vocabulary of 16,000,
``--max-added-tokens 4374``) on ../shared/data for both methods, each in a fresh child process, once per
``--workers`` count, ``--repeat`` times (medians reported); wall and CPU seconds per step come from
report.json (``seconds``, ``cpu_seconds``; the workers' CPU is one entry). With two or more worker counts it
reports the scaling efficiency ``T(w1) * w1 / (T(w) * w)``. Target: whole adaptation under 20 s wall on 2 idle
cores (default method).

``scale``: domain AND general training corpora both repeated by the same factor so that their total is
about each size in ``--sizes-mb`` (written as JSONL under a temporary folder in /tmp, deleted afterwards);
each run in a child process, default method, whose peak memory is its own peak RSS (VmHWM) plus the
largest of its worker processes' (ru_maxrss of the children; with several workers the sum can be higher).
Targets: peak memory under 2 GB, time about linear in size.
Timings are only meaningful on an otherwise idle machine. Prints markdown and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WALL_TARGET_S = 20.0
MEMORY_TARGET_MIB = 2048
FULL_SIZE_DOMAIN_VOCAB = 16000  # the GPU profiles' domain vocabulary (the stage's default is the tiny profile's)

# Runs in a fresh interpreter: the adaptation with the given parameters, then its peak memory.
CHILD = """
import json, resource, sys, time
from pathlib import Path
from dapt.tokenizer import TokenizerConfig, adapt_tokenizer
args = json.loads(sys.argv[1])
config = TokenizerConfig(**{k: (Path(v) if k in args["paths"] else v) for k, v in args["config"].items()})
started, cpu = time.perf_counter(), time.process_time()
adapt_tokenizer(config)
wall, cpu = time.perf_counter() - started, time.process_time() - cpu
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
children = resource.getrusage(resource.RUSAGE_CHILDREN)
print("BENCH " + json.dumps({
    "wall_s": wall, "cpu_s": cpu, "children_cpu_s": children.ru_utime + children.ru_stime,
    "peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024, "children_peak_rss_mib": children.ru_maxrss / 1024,
}))
"""


def _run_child(config: dict) -> dict:
    paths = [k for k, v in config.items() if isinstance(v, Path)]
    payload = json.dumps({"config": {k: str(v) if isinstance(v, Path) else v for k, v in config.items()},
                          "paths": paths})
    env = dict(os.environ, PYTHONPATH=str(REPO / "code"), TQDM_DISABLE="1")
    result = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"adaptation failed:\n{result.stderr[-3000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("BENCH "))
    measured = json.loads(line[6:])
    report = json.loads((Path(config["output"]) / "report.json").read_text())
    measured["peak_total_mib"] = measured["peak_rss_mib"] + measured["children_peak_rss_mib"]
    return {"measured": measured, "report": report}


def _base_config(data: Path, base: Path, output: Path) -> dict:
    return {
        "base_tokenizer": base, "domain_data": data / "domain", "general_data": data / "general",
        "heldout_domain": data / "heldout" / "domain_heldout.jsonl",
        "heldout_general": data / "heldout" / "general_heldout.jsonl",
        "output": output, "max_added_tokens": 4374, "domain_vocab_size": FULL_SIZE_DOMAIN_VOCAB,
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def bench_stages(data: Path, base: Path, scratch: Path, workers: list[int], repeat: int) -> dict:
    """The whole adaptation on ../shared/data, both methods, per worker count, with per-step seconds."""
    results: dict = {"workers": {}}
    for count in workers:
        per_method = {}
        for method in ("guided-bpe", "chipnemo"):
            runs = [_run_child(dict(_base_config(data, base, scratch / f"{method}-{count}-{k}"), method=method,
                                    workers=count)) for k in range(repeat)]
            walls = [run["measured"]["wall_s"] for run in runs]
            middle = runs[walls.index(sorted(walls)[len(walls) // 2])]
            report = middle["report"]
            per_method[method] = {
                "wall_s": round(_median(walls), 2),
                "wall_s_all": [round(w, 2) for w in walls],
                "cpu_s": round(middle["measured"]["cpu_s"], 2),
                "workers_cpu_s": round(middle["measured"]["children_cpu_s"], 2),
                "peak_total_mib": round(middle["measured"]["peak_total_mib"]),
                "stage_wall_s": report["seconds"],
                "stage_cpu_s": report["cpu_seconds"],
                "added_tokens": report["added_tokens"],
                "domain_heldout_change_percent": report["corpora"]["domain_heldout"]["change_percent"],
                "input_mb": round((report["corpora"]["domain_train"]["bytes"]
                                   + report["corpora"]["general_train"]["bytes"]) / 1e6, 2),
            }
        results["workers"][str(count)] = per_method
    first = str(workers[0])
    results["scaling_efficiency"] = {
        method: {str(w): round(results["workers"][first][method]["wall_s"] * workers[0]
                               / (results["workers"][str(w)][method]["wall_s"] * w), 3) for w in workers}
        for method in ("guided-bpe", "chipnemo")
    }
    results["meets_wall_target"] = min(r["guided-bpe"]["wall_s"] for r in results["workers"].values()) < WALL_TARGET_S
    return results


def _write_repeated(sources: list[Path], target: Path, factor: int) -> int:
    target.mkdir(parents=True)
    written = 0
    for source in sources:
        data = source.read_bytes()
        with open(target / source.name, "wb") as handle:
            for _ in range(factor):
                handle.write(data)
        written += len(data) * factor
    return written


def bench_scale(data: Path, base: Path, scratch: Path, sizes_mb: list[int]) -> dict:
    """Corpora repeated to each size: wall time, CPU time and peak memory of one whole adaptation."""
    domain_files = sorted((data / "domain").rglob("*.jsonl"))
    general_files = sorted((data / "general").rglob("*.jsonl"))
    unit = sum(f.stat().st_size for f in domain_files + general_files)
    rows = []
    for size in sizes_mb:
        factor = max(1, round(size * 1e6 / unit))
        corpus = scratch / f"x{factor}"
        domain_bytes = _write_repeated(domain_files, corpus / "domain", factor)
        general_bytes = _write_repeated(general_files, corpus / "general", factor)
        config = dict(_base_config(data, base, scratch / f"out{factor}"),
                      domain_data=corpus / "domain", general_data=corpus / "general")
        run = _run_child(config)
        shutil.rmtree(corpus)
        measured = run["measured"]
        rows.append({
            "repeat": factor,
            "input_mb": round((domain_bytes + general_bytes) / 1e6, 1),
            "domain_mb": round(domain_bytes / 1e6, 1),
            "general_mb": round(general_bytes / 1e6, 1),
            "wall_s": round(measured["wall_s"], 1),
            "cpu_s": round(measured["cpu_s"] + measured["children_cpu_s"], 1),
            "peak_total_mib": round(measured["peak_total_mib"]),
            "peak_parent_mib": round(measured["peak_rss_mib"]),
            "peak_largest_worker_mib": round(measured["children_peak_rss_mib"]),
            "training_lines": run["report"]["training_lines"],
            "stage_wall_s": run["report"]["seconds"],
        })
    for row in rows:
        row["wall_s_per_gb"] = round(row["wall_s"] / (row["input_mb"] / 1000), 1)
    return {
        "rows": rows,
        "meets_memory_target": all(r["peak_total_mib"] < MEMORY_TARGET_MIB for r in rows),
        "note": "domain and general corpora both repeated by the same factor; input_mb is their sum",
    }


def _markdown(results: dict) -> str:
    lines = []
    stages = results.get("stages")
    if stages and "skipped" not in stages:
        for count, per_method in stages["workers"].items():
            methods = [m for m in ("guided-bpe", "chipnemo") if m in per_method]
            names = list(dict.fromkeys(n for m in methods for n in per_method[m]["stage_cpu_s"]))
            lines += [f"\n**{count} worker(s)** (median of {len(per_method[methods[0]]['wall_s_all'])} runs)\n",
                      "| step | " + " | ".join(f"{m} wall s | {m} CPU s" for m in methods) + " |",
                      "|---|" + "---:|---:|" * len(methods)]
            for name in names:
                cells = [f"{per_method[m]['stage_wall_s'].get(name, '')} | {per_method[m]['stage_cpu_s'].get(name, '')}"
                         for m in methods]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("| **whole adaptation** | " + " | ".join(
                f"**{per_method[m]['wall_s']}** ({', '.join(map(str, per_method[m]['wall_s_all']))}) | "
                f"{per_method[m]['cpu_s']} + {per_method[m]['workers_cpu_s']} (workers)" for m in methods) + " |")
        lines.append(f"\nscaling efficiency T(w1) x w1 / (T(w) x w): {json.dumps(stages['scaling_efficiency'])}")
        lines.append(f"wall target < {WALL_TARGET_S} s (guided-bpe): {stages['meets_wall_target']}\n")
    scale = results.get("scale")
    if scale and "skipped" not in scale:
        lines += ["| input MB (domain + general) | repeat | wall s | CPU s | s per GB | peak MiB "
                  "| training lines used |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in scale["rows"]:
            lines.append(f"| {r['input_mb']} ({r['domain_mb']} + {r['general_mb']}) | {r['repeat']} | {r['wall_s']} | "
                         f"{r['cpu_s']} | {r['wall_s_per_gb']} | {r['peak_total_mib']} | "
                         f"{r['training_lines']['used']:,} of {r['training_lines']['seen']:,} |")
        lines.append(f"\npeak memory < {MEMORY_TARGET_MIB} MiB: {scale['meets_memory_target']} ({scale['note']})")
    for key in ("stages", "scale"):
        if results.get(key, {}).get("skipped"):
            lines.append(f"{key}: skipped ({results[key]['skipped']})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--base-tokenizer", type=Path,
                        default=SHARED / "models" / "llama2-tokenizer" / "tokenizer.model")
    parser.add_argument("--only", nargs="+", choices=["stages", "scale"], default=["stages", "scale"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2],
                        help="worker counts of the stages runs (the first is the scaling reference)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method and worker count (median)")
    parser.add_argument("--sizes-mb", nargs="+", type=int, default=[100, 300, 1000],
                        help="total input sizes of the scale run (domain + general, repeated)")
    parser.add_argument("--output", type=Path, default=REPO / "outputs" / "benchmarks" / "tokenizer.json")
    args = parser.parse_args()
    results: dict = {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    missing = [p for p in (args.data / "domain", args.data / "general", args.base_tokenizer) if not p.exists()]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_", dir="/tmp") as tmp:
        for part in args.only:
            if missing:
                results[part] = {"skipped": f"{', '.join(map(str, missing))} absent (needs ../shared)"}
            elif part == "stages":
                results[part] = bench_stages(args.data, args.base_tokenizer, Path(tmp) / "stages", args.workers,
                                             args.repeat)
            else:
                results[part] = bench_scale(args.data, args.base_tokenizer, Path(tmp) / "scale", args.sizes_mb)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["self_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(_markdown(results))
    print(f"\nJSON: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
