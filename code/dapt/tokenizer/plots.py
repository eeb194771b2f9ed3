"""The report's plots: the cumulative use of the added tokens, and compression per file type."""

from __future__ import annotations

from pathlib import Path


def plot_cumulative_use(domain_use: dict[str, int], threshold: float, path: Path) -> None:
    """Cumulative share of new-token uses against the number of tokens kept, with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.sort(np.asarray(list(domain_use.values()) or [0], dtype=float))[::-1]
    share = np.cumsum(counts) / max(counts.sum(), 1.0)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(share) + 1), share)
    ax.axhline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("added tokens, most used first")
    ax.set_ylabel("cumulative share of uses on domain data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compression(report: dict, path: Path) -> None:
    """Bytes per token before and after, per file type of the domain training data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    per_type = report["corpora"]["domain_train"]["by_file_type"]
    names = sorted(per_type, key=lambda n: -per_type[n]["bytes"])[:12]
    before = [per_type[n]["bytes_per_token_before"] for n in names]
    after = [per_type[n]["bytes_per_token_after"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, before, 0.4, label="base")
    ax.bar(x + 0.2, after, 0.4, label="adapted")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("bytes per token (higher is better)")
    ax.set_title(f"domain compression by file type ({report['method']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
