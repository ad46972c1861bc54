"""Evaluation outputs: TSV and JSON tables, PNG plots, and a plain-text table for the terminal.

Files (all in ``out_dir``):

- ``recall.tsv`` / ``recall.json``: the Recall@k rows of :func:`elva.eval.retrieval.evaluate_recall`;
- ``grains.tsv`` / ``grains.json``: the grain-sensitivity rows of :func:`elva.eval.grains.summarize_distances`;
- ``multigrain.tsv`` / ``multigrain.json``: multi-grain R@5 per task (when the synthetic benchmark was evaluated);
- ``recall_r5.png``: R@5 (or the first k when 5 is not among ``ks``) per (dataset, task), local and global pools side by side;
- ``grains.png``: mean cosine distance per grain type, with the paper's 0.07 / 0.15 for orientation.

A TSV has one header line of column names; floats are written with 6 decimals. A JSON file holds the list of rows.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def _columns(rows: Sequence[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    return columns


def _cell(value, float_format: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, float_format)
    return str(value)


def write_tsv(rows: Sequence[dict], path: str | Path) -> Path:
    """Rows as a TSV with a header line (columns in first-seen order; a missing value is an empty cell)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows)
    lines = ["\t".join(columns)]
    lines += ["\t".join(_cell(row.get(column), ".6f") for column in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_json(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(rows), indent=2) + "\n", encoding="utf-8")
    return path


def format_table(rows: Sequence[dict], *, float_format: str = ".4f") -> str:
    """An aligned plain-text table of ``rows`` (text columns left-aligned, numbers right-aligned)."""
    if not rows:
        return "(no rows)"
    columns = _columns(rows)
    cells = [[_cell(row.get(column), float_format) for column in columns] for row in rows]
    numeric = [all(isinstance(row.get(column), (int, float)) or row.get(column) is None for row in rows) for column in columns]
    widths = [max(len(column), *(len(line[j]) for line in cells)) for j, column in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(values) for values in cells])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_recall(rows: Sequence[dict], path: str | Path, *, k: int = 5) -> Path:
    """Bars of R@k per (dataset, task), one bar per pool, in the rows' order."""
    plt = _pyplot()
    metric = f"R@{k}"
    labels: list[str] = []
    values: dict[str, dict[str, float]] = {}
    for row in rows:
        label = f"{row['dataset']}\ntask{row['task']} ({row['task_name']})"
        if label not in labels:
            labels.append(label)
        values.setdefault(row["pool"], {})[label] = 100.0 * row.get(metric, float("nan"))
    pools = list(values)
    width = 0.8 / max(1, len(pools))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(labels) + 1.5), 4.0))
    for p, pool in enumerate(pools):
        xs = [i + (p - (len(pools) - 1) / 2) * width for i in range(len(labels))]
        heights = [values[pool].get(label, float("nan")) for label in labels]
        bars = ax.bar(xs, heights, width, label=f"{pool} pool")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Recall@{k} per (dataset, task)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_grains(rows: Sequence[dict], path: str | Path, *, reference: dict[str, float] | None = None) -> Path:
    """Bars of the mean masked-grain distance per grain type (the "overall" bar last), error bars of one std, and
    dashed reference lines (the paper's values by default)."""
    from elva.eval.grains import PAPER_SENSITIVITY

    plt = _pyplot()
    reference = PAPER_SENSITIVITY if reference is None else reference
    labels = [row["grain"] for row in rows]
    means = [row["mean_distance"] for row in rows]
    stds = [row.get("std_distance", 0.0) for row in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2.0), 3.8))
    colours = ["tab:grey" if label == "overall" else "tab:blue" for label in labels]
    bars = ax.bar(range(len(labels)), means, 0.7, yerr=stds, capsize=3, color=colours)
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    for (name, value), style in zip(reference.items(), ("--", ":", "-.")):
        ax.axhline(value, linestyle=style, color="tab:red", linewidth=1, label=f"paper {name}: {value:g}")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("mean 1 - cos(f(q), f(q without grain))")
    ax.set_title("Grain sensitivity")
    if reference:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, recall: Sequence[dict], grains: Sequence[dict] = (),
                 multigrain: Sequence[dict] = (), *, plots: bool = True) -> list[Path]:
    """Write every table (and plot, with ``plots``) that has rows; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for name, rows in (("recall", recall), ("grains", grains), ("multigrain", multigrain)):
        if rows:
            files += [write_tsv(rows, out / f"{name}.tsv"), write_json(rows, out / f"{name}.json")]
    if plots and recall:
        ks = [int(key[2:]) for key in recall[0] if key.startswith("R@")]
        k = 5 if 5 in ks else ks[0]
        files.append(plot_recall(recall, out / f"recall_r{k}.png", k=k))
    if plots and grains:
        files.append(plot_grains(grains, out / "grains.png"))
    return files
