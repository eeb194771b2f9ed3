"""The report's plots, each readable without the docs: which tokens were added and why that many
(``cumulative_use.png``), and what they do to each domain file type (``compression_by_file_type.png``)."""

from __future__ import annotations

from pathlib import Path

from dapt.tokenizer.candidates import Selection
from dapt.tokenizer.chipnemo import cumulative_cut


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def selection_account(selection: Selection, added: list[str], threshold: float, max_added: int | None,
                      method: str) -> list[str]:
    """How the number of added tokens came about, one line per step (the plot's note)."""
    ranked, cut = len(selection.ranking), cumulative_cut([u for _, u in selection.ranking], threshold)
    pruned = len(selection.pieces) - len(added)
    lines = []
    if method == "guided-bpe":
        learned = selection.details["merges_learned"]
        stop = f" (stopped at the cap, --max-added-tokens {max_added:,})" if learned == max_added else ""
        blocks = len(selection.pieces) - len(selection.chosen)
        lines += [f"{learned:,} merges learned{stop};",
                  f"{ranked:,} of them are used in the final domain segmentation (the curve);",
                  f"{len(selection.chosen):,} kept for their own use, most used first, to {threshold:.0%} of the uses"
                  + (f"\n   (at most {max_added:,} with building blocks: some passed over)" if selection.capped
                     and learned != max_added else "") + ";",
                  f"+ {blocks:,} building blocks they are merged from (orange: rarely or never",
                  "   used alone, but SentencePiece reaches a token only through its merges);"]
    else:
        lines += [f"{ranked:,} candidates are used on the domain data (the curve);",
                  f"the {cut:,} most used reach {threshold:.0%} of their uses"
                  + (f", capped at {max_added:,} (--max-added-tokens)" if selection.capped else "") + ";"]
    if pruned:
        lines.append(f"- {pruned:,} never produced on the domain data once merged (pruned);")
    lines.append(f"= {len(added):,} tokens added.")
    return lines


def plot_cumulative_use(selection: Selection, added: list[str], threshold: float, max_added: int | None,
                        method: str, path: Path) -> None:
    """Cumulative share of uses of the ranked tokens, the threshold's cut, where the added tokens rank, and
    the account of how many were added."""
    import numpy as np

    plt = _pyplot()
    uses = np.asarray([u for _, u in selection.ranking] or [0], dtype=float)
    share = np.cumsum(uses) / max(uses.sum(), 1.0)
    ranks = np.arange(1, len(uses) + 1)
    cut = cumulative_cut([u for _, u in selection.ranking], threshold)
    rank_of = {piece: k for k, (piece, _) in enumerate(selection.ranking)}
    chosen = set(selection.chosen)
    blocks = [p for p in added if p not in chosen]
    block_ranks = np.asarray(sorted(rank_of[p] for p in blocks if p in rank_of), dtype=int)
    unranked = len(blocks) - len(block_ranks)

    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.plot(ranks, share, color="tab:blue", label="cumulative share of all their uses")
    ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1,
               label=f"threshold {threshold:g} (--freq-threshold)")
    if cut:
        ax.axvline(cut, color="tab:red", linestyle=":", linewidth=1,
                   label=f"the {cut:,} most used reach {threshold:.0%}")
    kept_alone = [rank_of[p] for p in selection.chosen if p in added and p in rank_of]
    if kept_alone:
        ax.axvspan(0.5, max(kept_alone) + 1.5, color="tab:green", alpha=0.1,
                   label=f"added for their own use ({len(kept_alone):,})")
    if len(block_ranks):
        ax.plot(block_ranks + 1, share[block_ranks], "|", color="tab:orange", markersize=10,
                label=f"added as building blocks ({len(block_ranks):,} here"
                      + (f", {unranked:,} never used alone" if unranked else "") + ")")
    account = selection_account(selection, added, threshold, max_added, method)
    ax.text(0.98, 0.04, "\n".join(account), transform=ax.transAxes, ha="right", va="bottom", multialignment="left",
            fontsize=8, family="monospace", bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9})
    what = "learned merges" if method == "guided-bpe" else "candidate tokens"
    ax.set_title(f"Which {what} are added ({method}): {len(added):,} tokens")
    ax.set_xlabel(f"{what}, ranked by their use on the domain training data (most used first)")
    ax.set_ylabel("cumulative share of their uses on domain data")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compression(report: dict, path: Path, most: int = 12) -> None:
    """Bytes per token before and after for the domain file types with the most bytes, with the change in
    token count above each pair."""
    import numpy as np

    plt = _pyplot()
    per_type = report["corpora"]["domain_train"]["by_file_type"]
    names = sorted(per_type, key=lambda n: -per_type[n]["bytes"])[:most]
    before = [per_type[n]["bytes_per_token_before"] for n in names]
    after = [per_type[n]["bytes_per_token_after"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ax.bar(x - 0.2, before, 0.4, label=f"base tokenizer ({report['base_vocab_size']:,} tokens)", color="tab:gray")
    ax.bar(x + 0.2, after, 0.4, color="tab:blue",
           label=f"adapted (+{report['added_tokens']:,} tokens, {report['vocab_size']:,} with padding)")
    for k, name in enumerate(names):
        ax.annotate(f"{per_type[name]['change_percent']:+.0f}%", (x[k] + 0.2, after[k]), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    labels = [f"{n}\n{per_type[n]['documents']} docs" for n in names]
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel(f"file type (the {len(names)} with the most bytes); above the bars: change in token count")
    ax.set_ylabel("bytes per token (higher: fewer tokens)")
    total = report["corpora"]["domain_train"]["change_percent"]
    ax.set_title(f"Domain training data by file type ({report['method']}): {total:+.1f}% tokens overall")
    ax.set_ylim(0, max(after + before + [1.0]) * 1.15)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
