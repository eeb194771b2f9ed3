"""Run every benchmark, one after the other, and keep their outputs (one command).

    python benchmarks/run_all.py [--only tokenizer data embeddings train tradeoff] [--log-dir outputs/benchmarks]

Each benchmark is a script of its own (``python benchmarks/bench_<area>.py --help``); this runs them in
sequence on an otherwise idle machine (timings are only meaningful there), saves each one's output under
the log folder and prints a summary. Benchmarks that need ../shared skip with a reason where it is absent.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = {
    "tokenizer": ["bench_tokenizer.py"],
    "data": ["bench_data.py"],
    "embeddings": ["bench_embeddings.py"],
    "train": ["bench_train.py"],
    "tradeoff": ["tradeoff_tokenizer.py"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--log-dir", type=Path, default=REPO / "outputs" / "benchmarks")
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only:
        script, *extra = BENCHMARKS[name]
        log = args.log_dir / f"{name}.log"
        started = time.perf_counter()
        print(f"== {name}: benchmarks/{script} (log: {log})", flush=True)
        with open(log, "w") as handle:
            result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *extra], cwd=REPO,
                                    stdout=handle, stderr=subprocess.STDOUT)
        print(f"   exit {result.returncode} after {time.perf_counter() - started:.0f} s", flush=True)
        print("   " + "\n   ".join(log.read_text(errors="replace").splitlines()[-15:]), flush=True)
        if result.returncode:
            failed.append(name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
