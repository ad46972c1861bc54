"""sharded_similarity_topk: two gloo ranks give every rank the single-process top-k."""
import torch

from elva_kernels import sharded_similarity_topk, similarity_topk
from tests.helpers import spawn_gloo

QUERIES = torch.randn(6, 12, generator=torch.Generator().manual_seed(8))
POOL = torch.randn(101, 12, generator=torch.Generator().manual_seed(9))
POOL[70] = POOL[3]  # an exact tie across the two shards: the smaller global id must win
SPLIT = 40  # rank 0 holds ids [0, 40), rank 1 holds [40, 101)
EXCLUDE = torch.tensor([[3, 50], [-1, -1], [0, 100], [41, -1], [7, 8], [-1, 99]])
CASES = {
    "plain": dict(k=10),
    "k_above_a_shard": dict(k=70),
    "exclude_and_filter": dict(k=25, exclude=EXCLUDE, max_score=0.4),
    "dot": dict(k=5, metric="dot"),
}


def _worker(rank, out_dir):
    shard = POOL[:SPLIT] if rank == 0 else POOL[SPLIT:]
    results = {name: sharded_similarity_topk(QUERIES, shard, **kw) for name, kw in CASES.items()}
    explicit = sharded_similarity_topk(QUERIES, shard, 10, shard_offset=0 if rank == 0 else SPLIT)
    torch.save((results, explicit), out_dir / f"rank{rank}.pt")


def test_every_rank_gets_the_single_process_result(tmp_path):
    spawn_gloo(_worker, tmp_path)
    for rank in range(2):
        results, explicit = torch.load(tmp_path / f"rank{rank}.pt")
        for name, kw in CASES.items():
            values, indices = similarity_topk(QUERIES, POOL, **kw)
            assert torch.equal(results[name][1], indices), (rank, name)
            assert torch.equal(results[name][0], values), (rank, name)
        assert torch.equal(explicit[1], similarity_topk(QUERIES, POOL, 10)[1])
