"""Tokenizer trade-off: added tokens against held-out compression, for both merge methods.

    python benchmarks/tradeoff_tokenizer.py [--shared ../shared] [--budgets 1000 2000 4000 8000]

Builds the adapted tokenizer (the stage ``python -m dapt tokenizer`` runs, called through its Python entry
``dapt.tokenizer.adapt_tokenizer``, in a fresh process per build, so that "no cap" can be asked for) on
``../shared/data`` with the real Llama 2 tokenizer, sequentially (about a minute per build on 2 cores):

* the sweep: ``method="guided-bpe"`` and ``method="chipnemo"`` at each ``max_added_tokens`` budget,
  both with ``domain_vocab_size=32000`` (so chipnemo has enough candidates for 8,000); chipnemo also
  with ``freq_threshold=1.0``, so the cap and not the 98% cut sets its count;
* the full-size profiles' settings of each method (``domain_vocab_size=16000``, no cap; the stage's
  own defaults are the tiny profile's);
* the headline: guided-bpe capped at 4,374 added tokens (the original recipe's count) against
  chipnemo at the full-size settings, as a markdown table from ``dapt.tokenizer.report.comparison_table``.

Each run's folder (with its report.json) stays under ``--work``. Writes the results as JSON
(``--json``) and the trade-off plot (``--plot``), and prints both tables. Skips with a reason
where ../shared is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "code"))  # a PYTHONPATH or installed dapt comes first

import dapt  # noqa: E402
from dapt.tokenizer.report import comparison_table  # noqa: E402

HEADLINE_CAP = 4374  # tokens the original recipe added on ../shared/data (issue 2)
SWEEP_DOMAIN_VOCAB = 32000
FULL_SIZE = {"domain_vocab_size": 16000, "max_added_tokens": None}  # the GPU profiles' values

# Runs in a fresh interpreter: one adaptation with the TokenizerConfig fields given as JSON.
CHILD = """
import json, sys
from pathlib import Path
from dapt.tokenizer import TokenizerConfig, adapt_tokenizer
fields = json.loads(sys.argv[1])
paths = ("base_tokenizer", "domain_data", "general_data", "heldout_domain", "heldout_general", "output")
adapt_tokenizer(TokenizerConfig(**{k: Path(v) if k in paths else v for k, v in fields.items()}))
"""


@dataclass
class Run:
    """One tokenizer build: a name, the method and the TokenizerConfig fields beyond the data paths."""

    name: str
    method: str
    options: dict = field(default_factory=dict)
    group: str = "sweep"


def plan_runs(budgets: list[int]) -> list[Run]:
    """The sweep over budgets for both methods, the two full-size runs and the headline guided-bpe run."""
    runs = []
    for method in ("guided-bpe", "chipnemo"):
        for budget in budgets:
            options = {"max_added_tokens": budget, "domain_vocab_size": SWEEP_DOMAIN_VOCAB}
            if method == "chipnemo":
                options["freq_threshold"] = 1.0
            runs.append(Run(f"{method}-cap{budget}", method, options))
    runs.append(Run("guided-bpe-default", "guided-bpe", dict(FULL_SIZE), group="default"))
    runs.append(Run("chipnemo-default", "chipnemo", dict(FULL_SIZE), group="default"))
    runs.append(Run(f"guided-bpe-cap{HEADLINE_CAP}", "guided-bpe",
                    dict(FULL_SIZE, max_added_tokens=HEADLINE_CAP), group="headline"))
    return runs


def data_options(shared: Path) -> dict[str, str]:
    """The config fields naming the base tokenizer and the corpora in ``shared``."""
    data = shared / "data"
    return {
        "base_tokenizer": str(shared / "models" / "llama2-tokenizer" / "tokenizer.model"),
        "domain_data": str(data / "domain"),
        "general_data": str(data / "general"),
        "heldout_domain": str(data / "heldout" / "domain_heldout.jsonl"),
        "heldout_general": str(data / "heldout" / "general_heldout.jsonl"),
    }


def missing_inputs(shared: Path) -> list[str]:
    """Paths the runs need that do not exist."""
    return [value for value in data_options(shared).values() if not Path(value).exists()]


def build(run: Run, shared: Path, work: Path, reuse: bool) -> tuple[dict, float | None]:
    """Build one tokenizer with the CLI (same dapt package as this script); return its report and wall time."""
    output = work / run.name
    report_path = output / "report.json"
    if reuse and report_path.is_file():
        return json.loads(report_path.read_text(encoding="utf-8")), None
    env = dict(os.environ)
    package_root = str(Path(dapt.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    fields = {"method": run.method, **run.options, **data_options(shared), "output": str(output)}
    print(f"[{run.name}] adapt_tokenizer(TokenizerConfig(**{json.dumps(fields)}))", file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, json.dumps(fields)], check=True, env=env)
    seconds = time.perf_counter() - started
    return json.loads(report_path.read_text(encoding="utf-8")), seconds


def summarise(run: Run, report: dict, seconds: float | None) -> dict:
    """The numbers this benchmark compares, read from one report.json."""
    corpora, hf = report["corpora"], report["hf_agreement"]
    return {
        "name": run.name,
        "group": run.group,
        "method": run.method,
        "options": run.options,
        "added_tokens": report["added_tokens"],
        "vocab_size": report["vocab_size"],
        "domain_heldout_change_percent": corpora["domain_heldout"]["change_percent"],
        "general_heldout_change_percent": corpora["general_heldout"]["change_percent"],
        "general_heldout_docs_longer": corpora["general_heldout"]["documents_longer"],
        "domain_heldout_docs_longer": corpora["domain_heldout"]["documents_longer"],
        "domain_train_change_percent": corpora["domain_train"]["change_percent"],
        "general_train_change_percent": corpora["general_train"]["change_percent"],
        "hf_differing_domain_heldout": f"{hf['domain_heldout']['differing']}/{hf['domain_heldout']['documents']}",
        "hf_differing_general_heldout": f"{hf['general_heldout']['differing']}/{hf['general_heldout']['documents']}",
        "reachable": report["reachability"]["reachable"],
        "seen_in_domain_data": report["reachability"]["seen_in_domain_data"],
        "build_seconds": round(seconds, 1) if seconds is not None else None,
    }


def results_table(rows: list[dict]) -> str:
    """A markdown table with one line per run."""
    columns = [
        ("run", "name"), ("added", "added_tokens"), ("domain held-out", "domain_heldout_change_percent"),
        ("general held-out", "general_heldout_change_percent"), ("general docs longer", "general_heldout_docs_longer"),
        ("HF differs (domain)", "hf_differing_domain_heldout"),
        ("HF differs (general)", "hf_differing_general_heldout"),
        ("reachable", "reachable"), ("build s", "build_seconds"),
    ]

    def cell(row: dict, key: str) -> str:
        value = row[key]
        if key.endswith("change_percent"):
            return f"{value:+.2f}%"
        if isinstance(value, int):
            return f"{value:,}"
        return "reused" if value is None else str(value)

    header = "| " + " | ".join(label for label, _ in columns) + " |\n|---|" + "---:|" * (len(columns) - 1) + "\n"
    return header + "\n".join("| " + " | ".join(cell(row, key) for _, key in columns) + " |" for row in rows)


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Domain and general held-out change against added tokens, one line per method (defaults as stars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"guided-bpe": "tab:blue", "chipnemo": "tab:orange"}
    panels = (("domain_heldout_change_percent", "domain held-out text (fewer tokens: lower)"),
              ("general_heldout_change_percent", "general held-out text (should stay near 0)"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (key, title) in zip(axes, panels):
        for method, colour in colours.items():
            sweep = sorted((r for r in rows if r["method"] == method and r["group"] == "sweep"),
                           key=lambda r: r["added_tokens"])
            ax.plot([r["added_tokens"] for r in sweep], [r[key] for r in sweep], "o-", color=colour,
                    label=f"{method}, cap sweep (domain vocabulary {SWEEP_DOMAIN_VOCAB:,})")
            others = [r for r in rows if r["method"] == method and r["group"] != "sweep"]
            ax.plot([r["added_tokens"] for r in others], [r[key] for r in others], "*", color=colour,
                    markersize=12, linestyle="none", label=f"{method}, domain vocabulary 16,000")
            for r in others:
                text = "no cap" if r["group"] == "default" else f"cap {HEADLINE_CAP:,}"
                ax.annotate(text, (r["added_tokens"], r[key]), xytext=(6, 4), textcoords="offset points",
                            fontsize=7, color=colour)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("added tokens (before padding)")
        ax.set_ylabel("token count change vs Llama 2 (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("Llama 2 tokenizer adapted on ../shared/data: held-out token count against added tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder holding data/ and models/")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "tokenizer_tradeoff",
                        help="one tokenizer folder per run goes here")
    parser.add_argument("--json", type=Path, default=None, help="results JSON (default: WORK/tradeoff.json)")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "tokenizer_tradeoff.png")
    parser.add_argument("--reuse", action="store_true", help="read existing report.json files instead of rebuilding")
    args = parser.parse_args()

    missing = missing_inputs(args.shared)
    if missing:
        print(json.dumps({"skipped": f"needs the real corpora and Llama 2 tokenizer; absent: {', '.join(missing)}"}))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    rows, reports = [], {}
    for run in plan_runs(args.budgets):
        report, seconds = build(run, args.shared, args.work, args.reuse)
        reports[run.name] = report
        rows.append(summarise(run, report, seconds))

    headline = comparison_table({
        f"guided-bpe (cap {HEADLINE_CAP:,})": reports[f"guided-bpe-cap{HEADLINE_CAP}"],
        "chipnemo (full-size settings)": reports["chipnemo-default"],
    })
    plot_tradeoff(rows, args.plot)
    result = {"dapt_package": str(Path(dapt.__file__).resolve().parent), "runs": rows,
              "headline_table": headline, "runs_table": results_table(rows), "plot": str(args.plot)}
    json_path = args.json or args.work / "tradeoff.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(headline + "\n\n" + result["runs_table"] + f"\n\nresults: {json_path}\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
