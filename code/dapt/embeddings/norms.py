"""Row norms of the written matrices: a summary for the report and histograms of new rows against old."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dapt.embeddings.init_rules import row_blocks
from dapt.embeddings.vocabulary import NewToken

GROUPS = (("base", "tab:gray"), ("domain", "tab:blue"), ("reserved", "tab:orange"))


def row_norms(matrix: Any, tokens: list[NewToken]) -> dict[str, np.ndarray]:
    """L2 norms of base, domain and reserved rows."""
    import torch

    norms = np.empty(matrix.shape[0], dtype=np.float32)
    for start, block in row_blocks(matrix, torch.float32):
        norms[start : start + block.shape[0]] = block.norm(dim=1).numpy()
    base_rows = matrix.shape[0] - len(tokens)
    domain = [t.id for t in tokens if t.kind == "domain"]
    reserved = [t.id for t in tokens if t.kind == "reserved"]
    return {"base": norms[:base_rows], "domain": norms[domain], "reserved": norms[reserved]}


def summary(values: np.ndarray) -> dict:
    """Count, mean, min and max of some row norms (rounded for the report)."""
    if not len(values):
        return {"rows": 0}
    return {
        "rows": int(len(values)),
        "mean": round(float(values.mean()), 5),
        "min": round(float(values.min()), 5),
        "max": round(float(values.max()), 5),
    }


def plot_row_norms(norms: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """Histograms of row norms, new against old, one panel per written matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(norms), figsize=(6 * len(norms), 4), squeeze=False)
    for ax, (matrix, groups) in zip(axes[0], norms.items(), strict=True):
        values = np.concatenate([v for v in groups.values() if len(v)])
        bins = np.linspace(float(values.min()), float(values.max()) + 1e-6, 50)
        for label, color in GROUPS:
            if len(groups[label]):
                ax.hist(
                    groups[label],
                    bins=bins,
                    alpha=0.6,
                    color=color,
                    density=True,
                    label=f"{label} rows ({len(groups[label])})",
                )
        ax.set_title(f"{matrix}: L2 norm of rows")
        ax.set_xlabel("row norm")
        ax.set_ylabel("density")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
