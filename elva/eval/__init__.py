"""Evaluation of an ELVA embedder: M-BEIR Recall@k, multi-grain R@5 and grain sensitivity (SPEC Part B).

Entry point: :func:`evaluate`. It reads either the synthetic benchmark (a folder with ``manifest.json``, the path of
that file, or a :class:`~elva.data.synthetic.MultigrainManifest`) or an M-BEIR folder laid out as released::

    query/<split>/mbeir_<name>_<split>.jsonl                      one file per (dataset, task); union files skipped
    cand_pool/local/mbeir_<name>_<split>_cand_pool.jsonl          (or mbeir_<name>_cand_pool.jsonl)
    cand_pool/global/mbeir_union_<split>_cand_pool.jsonl          optional; without it the global pool is the
                                                                  union of the local pools (LamRA's "global")
    instructions/query_instructions.tsv                           optional; without it queries get no instruction
    <image paths in the files are relative to the folder itself>

Pieces: :mod:`elva.eval.retrieval` (encoding and Recall@k), :mod:`elva.eval.grains` (sensitivity, multi-grain R@5),
:mod:`elva.eval.report` (files and tables).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from elva.data.mbeir import load_instructions
from elva.eval.grains import grain_sensitivity, multigrain_r5
from elva.eval.report import format_table, write_json, write_report, write_tsv
from elva.eval.retrieval import EvalSources, QuerySet, evaluate_recall

__all__ = ["EvalSources", "QuerySet", "evaluate", "find_sources", "format_table", "write_json", "write_tsv"]


def _name_of(query_file: Path, split: str) -> str:
    stem = query_file.name[: -len(".jsonl")] if query_file.name.endswith(".jsonl") else query_file.stem
    stem = stem[len("mbeir_"):] if stem.startswith("mbeir_") else stem
    return stem[: -len(f"_{split}")] if stem.endswith(f"_{split}") else stem


def _from_manifest(manifest_path: Path, split: str) -> EvalSources:
    root = manifest_path.parent
    summary = json.loads(manifest_path.read_text(encoding="utf-8"))
    if split not in summary.get("queries", {}):
        raise ValueError(f"{manifest_path}: no split {split!r}; splits: {sorted(summary.get('queries', {}))}")
    tasks = sorted(summary["queries"][split], key=int)
    sets = tuple(
        QuerySet(_name_of(root / summary["queries"][split][task], split), root / summary["queries"][split][task],
                 root / summary["local_pools"][split][task])
        for task in tasks
    )
    global_pool = summary.get("global_pools", {}).get(split)
    instructions = summary.get("instructions")
    return EvalSources(sets, root / global_pool if global_pool else None, root / instructions if instructions else None,
                       root, split)


def _from_layout(root: Path, split: str) -> EvalSources:
    query_dir = root / "query" / split
    query_files = sorted(path for path in query_dir.glob("*.jsonl") if "union" not in path.name) if query_dir.is_dir() else []
    if not query_files:
        raise FileNotFoundError(
            f"{root}: neither a manifest.json (synthetic benchmark) nor M-BEIR query files query/{split}/mbeir_<name>_{split}.jsonl"
        )
    sets = []
    for query_file in query_files:
        name = _name_of(query_file, split)
        options = [root / "cand_pool/local" / f"mbeir_{name}_{split}_cand_pool.jsonl",
                   root / "cand_pool/local" / f"mbeir_{name}_cand_pool.jsonl"]
        local = next((path for path in options if path.is_file()), None)
        if local is None:
            raise FileNotFoundError(f"{query_file}: no local pool; looked for {', '.join(str(p) for p in options)}")
        sets.append(QuerySet(name, query_file, local))
    global_dir = root / "cand_pool/global"
    global_pool = global_dir / f"mbeir_union_{split}_cand_pool.jsonl"
    if not global_pool.is_file():
        others = sorted(global_dir.glob(f"*_{split}_cand_pool.jsonl")) if global_dir.is_dir() else []
        global_pool = others[0] if len(others) == 1 else None
    instructions = root / "instructions/query_instructions.tsv"
    return EvalSources(tuple(sets), global_pool, instructions if instructions.is_file() else None, root, split)


def find_sources(data_root_or_manifest, split: str = "test") -> EvalSources:
    """The files one evaluation reads: see the module docstring for what is accepted."""
    from elva.data.synthetic import MultigrainManifest

    if isinstance(data_root_or_manifest, EvalSources):
        return data_root_or_manifest
    if isinstance(data_root_or_manifest, MultigrainManifest):
        m = data_root_or_manifest
        if split not in m.queries:
            raise ValueError(f"the manifest has no split {split!r}; splits: {sorted(m.queries)}")
        sets = tuple(QuerySet(_name_of(m.queries[split][task], split), m.queries[split][task], m.local_pools[split][task])
                     for task in sorted(m.queries[split]))
        return EvalSources(sets, m.global_pools.get(split), m.instructions, m.root, split)
    if not isinstance(data_root_or_manifest, (str, Path)):
        raise TypeError("data_root_or_manifest must be a folder, a manifest.json path, a MultigrainManifest or "
                        f"EvalSources; got {type(data_root_or_manifest).__name__}")
    path = Path(data_root_or_manifest)
    if path.is_file() and path.name.endswith(".json"):
        return _from_manifest(path, split)
    if not path.is_dir():
        raise FileNotFoundError(f"data_root_or_manifest {str(path)!r} is neither a folder nor a manifest.json")
    if (path / "manifest.json").is_file():
        return _from_manifest(path / "manifest.json", split)
    return _from_layout(path, split)


def evaluate(embedder, data_root_or_manifest, out_dir, *, batch_size: int = 32, ks: Sequence[int] = (1, 5, 10),
             split: str = "test", grains: bool = True, plots: bool = True, progress: bool = True,
             extraction: str | None = None) -> dict:
    """Evaluate ``embedder`` (anything with ``embed(items, instructions=None, batch_size=32) -> [n, d]``) and write
    the report into ``out_dir``. For an ElvaEmbedder, ``extraction`` picks "emb" or "generative" (greedy summary,
    then ``[RET]``); None uses the model's own (``config.extraction``).

    Returns {"recall": rows, "grains": rows, "multigrain": rows, "files": [str paths]}:

    - recall: one row per (dataset, task, pool) with R@k fractions (:func:`elva.eval.retrieval.evaluate_recall`);
    - grains: mean masked-grain cosine distance per grain type and "overall" (empty for data without text grains);
    - multigrain: R@5 per task on the synthetic benchmark's local pools, and their mean (empty for other data).
    """
    from elva.generative import encoder_for

    embedder = encoder_for(embedder, extraction)
    sources = find_sources(data_root_or_manifest, split)
    instructions = load_instructions(sources.instructions) if sources.instructions is not None else None
    loaded: dict = {}
    recall = evaluate_recall(embedder, sources, ks=ks, batch_size=batch_size, progress=progress,
                             instructions=instructions, loaded=loaded)
    grain_rows: list[dict] = []
    if grains:
        queries = [query for query_set in sources.query_sets for query in loaded["queries"][query_set.name]]
        grain_rows = grain_sensitivity(embedder, queries, sources.image_root, instructions, loaded["candidates"],
                                       batch_size=batch_size, progress=progress)
    multigrain = multigrain_r5(recall)
    files = write_report(out_dir, recall, grain_rows, multigrain, plots=plots)
    return {"recall": recall, "grains": grain_rows, "multigrain": multigrain, "files": [str(path) for path in files]}
