"""``elva mine``: ELVA's balanced negatives (A5) for a query set, cached to disk for the RL stage.

Queries and the pool are encoded by the model being trained (each query with its instruction), then
``elva_kernels.mine_hard_negatives`` picks, per query, the ``n_hard`` hardest candidates that are not positives
and score at most ``max_score`` (the near-duplicate filter), plus ``n_random`` uniform ones. The result is a
jsonl file, one line per query: ``{"qid", "hard": [did, ...], "random": [did, ...]}``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import elva_kernels
from elva.data.mbeir import InstructionTable, MBeirCandidate, MBeirQuery, load_instructions, load_pool, load_queries
from elva.eval import find_sources
from elva.eval.retrieval import CandidateCache, encode_queries, positive_rows


def mine_records(embedder, query_sets: Iterable[tuple[str, Sequence[MBeirQuery]]],
                 pool: Mapping[str, MBeirCandidate], image_root, instructions: InstructionTable | None, *,
                 n_hard: int = 50, n_random: int = 50, max_score: float | None = None, seed: int = 0,
                 batch_size: int = 32, progress: bool = True):
    """Yield ``{"qid", "hard", "random"}`` per query of each (name, queries) set, the pool encoded once."""
    cache = CandidateCache(embedder, image_root, batch_size=batch_size, progress=progress)
    cache.add(pool, "pool")
    dids = list(pool)
    pool_emb = elva_kernels.Candidates(cache.matrix(dids))  # one norm pass for every query set
    for name, queries in query_sets:
        query_emb = encode_queries(embedder, queries, image_root, instructions, pool, batch_size=batch_size,
                                   desc=name, progress=progress)
        positives = positive_rows(queries, dids).to(query_emb.device)
        mined = elva_kernels.mine_hard_negatives(
            query_emb, pool_emb, positives, n_hard=n_hard, n_random=n_random, max_score=max_score, seed=seed
        ).cpu()
        for query, row in zip(queries, mined.tolist()):
            ids = [dids[i] if i >= 0 else None for i in row]
            yield {"qid": query.qid, "hard": [d for d in ids[:n_hard] if d], "random": [d for d in ids[n_hard:] if d]}


def write_records(records: Iterable[dict], out_file) -> Path:
    """Write jsonl atomically: a killed run leaves no truncated cache behind."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    os.replace(partial, out_file)
    return out_file


def mine(embedder, data_root, out_file, *, split: str = "train", n_hard: int = 50, n_random: int = 50,
         max_score: float | None = None, seed: int = 0, batch_size: int = 32, progress: bool = True) -> Path:
    sources = find_sources(data_root, split)
    instructions = load_instructions(sources.instructions) if sources.instructions else None
    pools = [load_pool(query_set.local_pool) for query_set in sources.query_sets]
    pool = load_pool(sources.global_pool) if sources.global_pool else {k: v for p in pools for k, v in p.items()}
    query_sets = ((query_set.name, load_queries(query_set.queries, pool=pool)) for query_set in sources.query_sets)
    return write_records(mine_records(embedder, query_sets, pool, sources.image_root, instructions, n_hard=n_hard,
                                      n_random=n_random, max_score=max_score, seed=seed, batch_size=batch_size,
                                      progress=progress), out_file)
