"""Execute both notebooks in order with papermill (the main job).

    python scripts/run_notebooks.py [--profile tiny] [--output-dir outputs/notebooks] [-p NAME VALUE ...]

Executed copies, with every output and plot, land in the output folder; the
notebooks in code/ stay clean. Any failing cell stops the run with a non-zero exit.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import papermill

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("custom_tokenization.ipynb", "domain_adaptive_pretraining.ipynb")


def run(profile: str, output_dir: Path, extra: dict[str, str]) -> list[Path]:
    """Run the notebooks with ``profile`` and extra parameters; return the executed copies."""
    output_dir.mkdir(parents=True, exist_ok=True)
    executed = []
    for name in NOTEBOOKS:
        started = time.perf_counter()
        target = output_dir / name
        papermill.execute_notebook(
            str(REPO / "code" / name), str(target), cwd=str(REPO / "code"),
            parameters={"PROFILE": profile, **extra}, kernel_name="python3", progress_bar=False,
        )
        print(f"{name}: executed in {time.perf_counter() - started:.0f} s -> {target}", flush=True)
        executed.append(target)
    return executed


def _literal(value: str) -> object:
    """``-p NAME 3`` gives an int, ``-p NAME abc`` a string."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "notebooks")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = parser.parse_args()
    run(args.profile, args.output_dir, {name: _literal(value) for name, value in args.parameter})
    return 0


if __name__ == "__main__":
    sys.exit(main())
