"""Recall@k per (dataset, task) on local pools and on a global pool, M-BEIR style (SPEC Part B, Evaluation).

The protocol follows UniIR/LamRA (``reference/pipeline_anchors.md`` §1.6, §2.2-2.3):

- a query gets its task instruction, looked up by (dataset_id, query modality, modality of its first positive); we
  always take the **first** prompt variant, so an evaluation is deterministic (LamRA draws one at random);
- a candidate is encoded by its modality: its text, its image, or the (image, text) pair; never with an instruction;
- Recall@k is M-BEIR's hit rate: a query scores 1 when any of its positives (``pos_cand_list``) is in the top k. A
  positive absent from the pool cannot be retrieved; a query with none of its positives in the pool counts as a miss;
- ranks come from :func:`elva_kernels.rank_statistics` (cosine, ties broken by candidate index), which never builds
  the [queries x pool] score matrix.

Each distinct candidate ``did`` is encoded once and shared by every pool that holds it, and each query file's queries
are encoded once and scored against both their local pool and the global pool.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import elva_kernels
from elva.data.mbeir import TASKS, InstructionTable, MBeirCandidate, MBeirQuery, load_pool, load_queries, resolve_image

# UniIR's DATASET_IDS (pipeline_anchors.md §2.2), plus the synthetic benchmark's id (elva.data.synthetic.DATASET_ID).
DATASET_NAMES = {
    "0": "visualnews",
    "1": "fashion200k",
    "2": "webqa",
    "3": "edis",
    "4": "nights",
    "5": "oven",
    "6": "infoseek",
    "7": "fashioniq",
    "8": "cirr",
    "9": "mscoco",
    "10": "multigrain",
}
TASK_NAMES = {
    task: f"{query.replace(',', '+')}->{cand.replace(',', '+')}" for task, (query, cand) in TASKS.items()
}
POOL_ORDER = ("local", "global")


@dataclass(frozen=True)
class QuerySet:
    """One query file and the local pool its queries are ranked in."""

    name: str  # e.g. "multigrain_task0", from the file name
    queries: Path
    local_pool: Path


@dataclass(frozen=True)
class EvalSources:
    """Everything one evaluation reads. ``global_pool`` None means: the union of the local pools (LamRA's global)."""

    query_sets: tuple[QuerySet, ...]
    global_pool: Path | None
    instructions: Path | None
    image_root: Path
    split: str = "test"


# ---- items ---------------------------------------------------------------------------------------------------------
def load_image(image_root: str | Path, relative_path: str, *, referenced_by: str = ""):
    """The RGB PIL image at ``image_root / relative_path`` (fully read, so the file is closed)."""
    from PIL import Image

    path = resolve_image(image_root, relative_path, referenced_by=referenced_by)
    with Image.open(path) as image:
        return image.convert("RGB")


def candidate_item(candidate: MBeirCandidate, image_root: str | Path):
    """The embedder item of a candidate: its text, its image or the (image, text) pair, by its modality."""
    if candidate.modality == "text":
        return candidate.txt
    image = load_image(image_root, candidate.img_path, referenced_by=candidate.origin)
    return image if candidate.modality == "image" else (image, candidate.txt)


def query_item(query: MBeirQuery, image_root: str | Path, text: str | None = None):
    """The embedder item of a query (``text`` replaces its text: the grain-masked query of :mod:`elva.eval.grains`)."""
    text = query.query_txt if text is None else text
    if query.query_modality == "text":
        return text
    image = load_image(image_root, query.query_img_path, referenced_by=query.origin)
    if query.query_modality == "image" or not text:
        return image
    return (image, text)


def query_instruction(query: MBeirQuery, instructions: InstructionTable | None,
                      candidates: Mapping[str, MBeirCandidate]) -> str | None:
    """The first prompt variant for the query, or None without an instruction table.

    The key's candidate modality is that of the query's first positive found in ``candidates``, as LamRA does; when
    no positive is known, the task's candidate modality (``TASKS``) stands in.
    """
    if instructions is None:
        return None
    positive = next((candidates[did] for did in query.pos_cand_list if did in candidates), None)
    cand_modality = positive.modality if positive is not None else TASKS[query.task_id][1]
    return instructions.lookup(query.dataset_id, query.query_modality, cand_modality)[0]


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def embed_in_batches(embedder, n: int, make_items: Callable[[int, int], tuple[list, list | None]], *,
                     batch_size: int, desc: str, progress: bool) -> torch.Tensor:
    """fp32 [n, d] embeddings, built ``batch_size`` items at a time so only one batch of images is in memory.

    ``make_items(start, stop)`` returns the items and instructions (a list or None) of rows [start, stop).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    chunks = []
    starts = range(0, n, batch_size)
    for start in _progress(starts, len(starts), desc, progress):
        items, instructions = make_items(start, min(start + batch_size, n))
        chunks.append(embedder.embed(items, instructions=instructions, batch_size=batch_size).float())
    if not chunks:
        raise ValueError(f"{desc}: nothing to embed")
    return torch.cat(chunks)


class CandidateCache:
    """Embeddings of candidates by did, each encoded once however many pools hold it."""

    def __init__(self, embedder, image_root: str | Path, *, batch_size: int = 32, progress: bool = True):
        self.embedder, self.image_root = embedder, Path(image_root)
        self.batch_size, self.progress = batch_size, progress
        self.rows: dict[str, int] = {}
        self.chunks: list[torch.Tensor] = []
        self._matrix: torch.Tensor | None = None

    def add(self, pool: Mapping[str, MBeirCandidate], desc: str) -> None:
        new = [candidate for did, candidate in pool.items() if did not in self.rows]
        if not new:
            return
        emb = embed_in_batches(
            self.embedder, len(new),
            lambda a, b: ([candidate_item(c, self.image_root) for c in new[a:b]], None),
            batch_size=self.batch_size, desc=desc, progress=self.progress,
        )
        for candidate in new:
            self.rows[candidate.did] = len(self.rows)
        self.chunks.append(emb)
        self._matrix = None

    def matrix(self, dids: Sequence[str]) -> torch.Tensor:
        """[len(dids), d] in the order of ``dids``."""
        if self._matrix is None:
            self._matrix = torch.cat(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
            self.chunks = [self._matrix]
        index = torch.tensor([self.rows[did] for did in dids], dtype=torch.long, device=self._matrix.device)
        return self._matrix.index_select(0, index)


def encode_queries(embedder, queries: Sequence[MBeirQuery], image_root: str | Path,
                   instructions: InstructionTable | None, candidates: Mapping[str, MBeirCandidate], *,
                   batch_size: int = 32, desc: str = "queries", progress: bool = True) -> torch.Tensor:
    """fp32 [len(queries), d]: each query with the first variant of its instruction."""
    prompts = [query_instruction(query, instructions, candidates) for query in queries]
    return embed_in_batches(
        embedder, len(queries),
        lambda a, b: ([query_item(q, image_root) for q in queries[a:b]], prompts[a:b] if instructions else None),
        batch_size=batch_size, desc=desc, progress=progress,
    )


# ---- recall ----------------------------------------------------------------------------------------------------------
def positive_rows(queries: Sequence[MBeirQuery], pool_dids: Sequence[str]) -> torch.Tensor:
    """int64 [B, m]: each query's positives as row indices of the pool, -1 padded (a row of -1: none in the pool)."""
    index = {did: row for row, did in enumerate(pool_dids)}
    lists = [[index[did] for did in dict.fromkeys(q.pos_cand_list) if did in index] for q in queries]
    width = max(1, max((len(rows) for rows in lists), default=1))
    out = torch.full((len(lists), width), -1, dtype=torch.int64)
    for i, rows in enumerate(lists):
        out[i, : len(rows)] = torch.tensor(rows, dtype=torch.int64)
    return out


def recall_at_k(query_emb: torch.Tensor, pool_emb: torch.Tensor | elva_kernels.Candidates,
                positives: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """float [len(ks)]: the fraction of queries with a positive in the top k (M-BEIR Recall@k), via A2.

    ``pool_emb`` is the pool's [N, d] embeddings or, for a pool scored many times, an ``elva_kernels.Candidates``
    handle of them. ``positives`` is int64 [B, m], -1 padded; a row without a positive counts as a miss.
    """
    positives = positives.to(query_emb.device)
    has_positive = (positives >= 0).any(dim=1)
    hits = torch.zeros(len(ks), dtype=torch.float64)
    if bool(has_positive.any()):
        keep = has_positive.nonzero().flatten()
        stats = elva_kernels.rank_statistics(
            query_emb.index_select(0, keep), pool_emb, positives.index_select(0, keep), metric="cosine", ks=tuple(ks)
        )
        hits = stats.hits.sum(dim=0).to("cpu", torch.float64)
    return hits / max(1, positives.shape[0])


def dataset_name(dataset_id: str, fallback: str = "") -> str:
    return DATASET_NAMES.get(str(dataset_id), fallback or f"dataset{dataset_id}")


def _row(dataset_id: str, name: str, task: int, pool: str, pool_size: int, queries: Sequence[MBeirQuery],
         positives: torch.Tensor, recalls: torch.Tensor, ks: Sequence[int]) -> dict:
    row = {
        "dataset": dataset_name(dataset_id, name),
        "dataset_id": str(dataset_id),
        "task": int(task),
        "task_name": TASK_NAMES[int(task)],
        "pool": pool,
        "pool_size": int(pool_size),
        "n_queries": len(queries),
        "n_without_positive": int((~(positives >= 0).any(dim=1)).sum()),
    }
    for k, value in zip(ks, recalls.tolist()):
        row[f"R@{k}"] = float(value)
    return row


def sort_rows(rows: list[dict]) -> list[dict]:
    """M-BEIR order: local pools first, then global; within each, task id ascending, then dataset id, then name."""
    def key(row):
        dataset_id = row["dataset_id"]
        numeric = int(dataset_id) if str(dataset_id).isdigit() else 1 << 30
        return (POOL_ORDER.index(row["pool"]), row["task"], numeric, str(dataset_id), row["dataset"])

    return sorted(rows, key=key)


def evaluate_recall(embedder, sources: EvalSources, *, ks: Sequence[int] = (1, 5, 10), batch_size: int = 32,
                    progress: bool = True, instructions: InstructionTable | None = None,
                    loaded: dict | None = None) -> list[dict]:
    """Recall@k rows for every (dataset, task) of ``sources``, on its local pool and on the global pool.

    Each row: dataset, dataset_id, task, task_name, pool ("local" | "global"), pool_size, n_queries,
    n_without_positive, then ``R@k`` (a fraction in [0, 1]) for each k. Rows come in :func:`sort_rows` order.
    ``loaded`` (optional) receives {"queries": {name: [...]}, "candidates": {did: candidate}} for reuse.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of ints >= 1; got {ks!r}")
    local_pools = {qs.name: load_pool(qs.local_pool) for qs in sources.query_sets}
    if sources.global_pool is not None:
        global_pool = load_pool(sources.global_pool)
    else:
        global_pool = {}
        for pool in local_pools.values():
            for did, candidate in pool.items():
                global_pool.setdefault(did, candidate)
    candidates: dict[str, MBeirCandidate] = dict(global_pool)
    for pool in local_pools.values():
        for did, candidate in pool.items():
            candidates.setdefault(did, candidate)

    cache = CandidateCache(embedder, sources.image_root, batch_size=batch_size, progress=progress)
    cache.add(global_pool, desc="global pool")
    for name, pool in local_pools.items():
        cache.add(pool, desc=f"{name} pool")
    global_dids = list(global_pool)
    # Each pool is scored by every query group: its cosine scales are computed once.
    global_emb = elva_kernels.Candidates(cache.matrix(global_dids))

    rows: list[dict] = []
    all_queries: dict[str, list[MBeirQuery]] = {}
    for query_set in sources.query_sets:
        queries = load_queries(query_set.queries)
        all_queries[query_set.name] = queries
        if not queries:
            continue
        query_emb = encode_queries(embedder, queries, sources.image_root, instructions, candidates,
                                   batch_size=batch_size, desc=f"{query_set.name} queries", progress=progress)
        local_dids = list(local_pools[query_set.name])
        local_emb = elva_kernels.Candidates(cache.matrix(local_dids))
        groups: dict[tuple[str, int], list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault((query.dataset_id, query.task_id), []).append(i)
        for (dataset_id, task), members in groups.items():
            group = [queries[i] for i in members]
            emb = query_emb.index_select(0, torch.tensor(members, device=query_emb.device))
            for pool_name, dids, pool_emb in (("local", local_dids, local_emb), ("global", global_dids, global_emb)):
                positives = positive_rows(group, dids)
                recalls = recall_at_k(emb, pool_emb, positives, ks)
                rows.append(_row(dataset_id, query_set.name.split("_task")[0], task, pool_name, len(dids), group,
                                 positives, recalls, ks))
    if loaded is not None:
        loaded["queries"] = all_queries
        loaded["candidates"] = candidates
    return sort_rows(rows)
