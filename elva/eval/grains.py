"""Grain sensitivity and multi-grain R@5 (SPEC Part B, Evaluation; paper §4.4).

Grain sensitivity is the paper's measure of "grain blindness": d(f(q), f(q without grain k)) = 1 - cos, the cosine
distance between the embedding of a query and that of the same query with the words of one grain removed
(:func:`elva.data.synthetic.drop_grain`). The paper reports a mean of 0.07 for the baseline and 0.15 after ELVA; a
higher value means the embedding reacts more to each grain.

Only grains with a span in the query text can be masked, so image-only queries add nothing. A query keeps its image
(an (image, text) query stays one, with the masked text) and its instruction (the first variant, as in
:mod:`elva.eval.retrieval`), so the only difference between the two inputs is the grain's words.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from elva.data.mbeir import InstructionTable, MBeirCandidate, MBeirQuery
from elva.data.synthetic import drop_grain, grains_of
from elva.eval.retrieval import TASK_NAMES, embed_in_batches, query_instruction, query_item

# Paper §4.4, mean over grain types (Qwen2-VL-7B): for orientation on the plot.
PAPER_SENSITIVITY = {"baseline": 0.07, "ELVA": 0.15}


def text_grain_types(query: MBeirQuery) -> list[str]:
    """The grain types with a span in the query text, in the order they are recorded, each once."""
    return list(dict.fromkeys(grain.type for grain in grains_of(query) if grain.span is not None))


def grain_distances(embedder, queries: Sequence[MBeirQuery], image_root: str | Path,
                    instructions: InstructionTable | None = None,
                    candidates: Mapping[str, MBeirCandidate] | None = None, *,
                    batch_size: int = 32, progress: bool = True) -> list[dict]:
    """One record per (query, text grain type): {"qid", "task", "grain", "distance"} with distance = 1 - cos.

    The unmasked query is encoded once; each masked variant once.
    """
    candidates = candidates or {}
    pairs = [(i, grain) for i, query in enumerate(queries) for grain in text_grain_types(query)]
    if not pairs:
        return []
    used = sorted({i for i, _ in pairs})
    prompts = {i: query_instruction(queries[i], instructions, candidates) for i in used}
    # Rows 0..len(used)-1 are the unmasked queries, then one row per pair.
    specs = [(i, None) for i in used] + [(i, drop_grain(queries[i], grain)) for i, grain in pairs]

    def make_items(a, b):
        items = [query_item(queries[i], image_root, text=text) for i, text in specs[a:b]]
        return items, ([prompts[i] for i, _ in specs[a:b]] if instructions is not None else None)

    emb = embed_in_batches(embedder, len(specs), make_items, batch_size=batch_size, desc="grain masks",
                           progress=progress)
    emb = F.normalize(emb.float(), dim=-1, eps=1e-12)
    base_row = {i: row for row, i in enumerate(used)}
    base = emb.index_select(0, torch.tensor([base_row[i] for i, _ in pairs], device=emb.device))
    masked = emb[len(used):]
    distance = (1.0 - (base * masked).sum(dim=-1)).clamp(0.0, 2.0).cpu().tolist()
    return [
        {"qid": queries[i].qid, "task": queries[i].task_id, "grain": grain, "distance": float(d)}
        for (i, grain), d in zip(pairs, distance)
    ]


def _summary(label: str, values: list[float], tasks: set[int]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {
        "grain": label,
        "n": len(values),
        "mean_distance": float(t.mean()),
        "std_distance": float(t.std(unbiased=False)),
        "min_distance": float(t.min()),
        "max_distance": float(t.max()),
        "tasks": ",".join(str(task) for task in sorted(tasks)),
    }


def summarize_distances(records: Sequence[dict]) -> list[dict]:
    """Rows per grain type (in first-seen order), then an "overall" row over every (query, grain) pair.

    Each row: grain, n, mean_distance, std_distance (population), min_distance, max_distance, tasks (the task ids
    that contributed, comma-separated).
    """
    by_grain: dict[str, list[float]] = {}
    tasks: dict[str, set[int]] = {}
    for record in records:
        by_grain.setdefault(record["grain"], []).append(record["distance"])
        tasks.setdefault(record["grain"], set()).add(record["task"])
    if not by_grain:
        return []
    rows = [_summary(grain, values, tasks[grain]) for grain, values in by_grain.items()]
    rows.append(_summary("overall", [r["distance"] for r in records], {r["task"] for r in records}))
    return rows


def grain_sensitivity(embedder, queries: Sequence[MBeirQuery], image_root: str | Path,
                      instructions: InstructionTable | None = None,
                      candidates: Mapping[str, MBeirCandidate] | None = None, *,
                      batch_size: int = 32, progress: bool = True) -> list[dict]:
    """Mean masked-grain cosine distance per grain type and overall (:func:`summarize_distances` rows)."""
    return summarize_distances(grain_distances(embedder, queries, image_root, instructions, candidates,
                                               batch_size=batch_size, progress=progress))


def multigrain_r5(recall_rows: Sequence[dict], dataset: str = "multigrain", pool: str = "local") -> list[dict]:
    """Multi-grain R@5 per task: the recall table's R@5 on the synthetic benchmark's local pools, plus a mean row.

    Rows: task, task_name, n_queries, R@5; the last has task "mean" (the unweighted mean over tasks, as M-BEIR
    averages).
    """
    rows = [
        {"task": row["task"], "task_name": row["task_name"], "n_queries": row["n_queries"], "R@5": row["R@5"]}
        for row in recall_rows
        if row["dataset"] == dataset and row["pool"] == pool and "R@5" in row
    ]
    if rows:
        rows.append({"task": "mean", "task_name": "all", "n_queries": sum(r["n_queries"] for r in rows),
                     "R@5": sum(r["R@5"] for r in rows) / len(rows)})
    return rows


__all__ = ["PAPER_SENSITIVITY", "TASK_NAMES", "grain_distances", "grain_sensitivity", "multigrain_r5",
           "summarize_distances", "text_grain_types"]
