"""rank_statistics: reference against a materialised count, ranx's MRR/hit rate, and similarity_topk."""
import pytest
import torch

from elva_kernels import rank_statistics, similarity_topk
from tests.helpers import random_rows, ragged_size
from tests.ops import naive


def random_positives(gen, rows, pool, *, width):
    positives = torch.randint(0, pool, (rows, width), generator=gen)
    positives[:, 1:][torch.rand(rows, width - 1, generator=gen) < 0.4] = -1  # ragged lists; column 0 always real
    return positives


def materialised_rank(queries, candidates, positives, metric="cosine", exclude=None):
    s = naive.scores(queries, candidates, metric)
    ranks, pos_scores, max_negs = [], [], []
    for row in range(s.shape[0]):
        pos = sorted({p for p in positives[row].tolist() if p >= 0})
        excluded = set() if exclude is None else {e for e in exclude[row].tolist() if e >= 0}
        best = max(pos, key=lambda p: (s[row, p].item(), -p))
        negatives = [c for c in range(s.shape[1]) if c not in pos and c not in excluded]
        ahead = sum(1 for c in negatives if (s[row, c] > s[row, best]) or (s[row, c] == s[row, best] and c < best))
        ranks.append(ahead + 1)
        pos_scores.append(s[row, best].item())
        max_negs.append(max((s[row, c].item() for c in negatives), default=float("-inf")))
    return torch.tensor(ranks), torch.tensor(pos_scores), torch.tensor(max_negs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_matches_materialised_count(dtype):
    gen = torch.Generator().manual_seed(4)
    for case in range(30):
        rows, pool, dim = ragged_size(gen, 1, 12), ragged_size(gen, 1, 120), ragged_size(gen, 1, 24)
        queries = random_rows(gen, rows, dim, ties=False).to(dtype)
        candidates = random_rows(gen, pool, dim, ties=True).to(dtype)
        positives = random_positives(gen, rows, pool, width=ragged_size(gen, 1, 4))
        exclude = torch.randint(-1, pool, (rows, 3), generator=gen) if case % 2 else None
        metric = "dot" if case % 3 == 0 else "cosine"
        stats = rank_statistics(queries, candidates, positives, metric=metric, exclude=exclude, backend="torch")
        rank, pos_score, max_neg = materialised_rank(queries, candidates, positives, metric, exclude)
        assert torch.equal(stats.rank, rank)
        assert torch.equal(stats.pos_score, pos_score)
        assert torch.equal(stats.max_neg_score, max_neg)
        assert torch.equal(stats.margin, pos_score - max_neg)
        assert torch.equal(stats.reciprocal_rank, 1.0 / rank.float())


def test_matches_ranx_mrr_and_hit_rate():
    from ranx import Qrels, Run, evaluate

    gen = torch.Generator().manual_seed(5)
    queries, candidates = torch.randn(40, 16, generator=gen), torch.randn(200, 16, generator=gen)
    positives = random_positives(gen, 40, 200, width=3)
    stats = rank_statistics(queries, candidates, positives, ks=(1, 5, 10), backend="torch")
    s = naive.scores(queries, candidates)
    qrels = Qrels({f"q{i}": {f"d{p}": 1 for p in row if p >= 0} for i, row in enumerate(positives.tolist())})
    run = Run({f"q{i}": {f"d{j}": float(v) for j, v in enumerate(row)} for i, row in enumerate(s.tolist())})
    expected = evaluate(qrels, run, ["mrr", "hit_rate@1", "hit_rate@5", "hit_rate@10"])
    assert stats.reciprocal_rank.mean().item() == pytest.approx(expected["mrr"], abs=1e-6)
    for column, k in enumerate((1, 5, 10)):
        assert stats.hits[:, column].float().mean().item() == pytest.approx(expected[f"hit_rate@{k}"], abs=1e-9)


def test_recall_agrees_with_similarity_topk_under_ties():
    gen = torch.Generator().manual_seed(6)
    for _ in range(20):
        rows, pool = ragged_size(gen, 1, 10), ragged_size(gen, 2, 80)
        queries = random_rows(gen, rows, 8, ties=False)
        candidates = random_rows(gen, pool, 8, ties=True)
        positives = random_positives(gen, rows, pool, width=3)
        ks = (1, 2, 5, pool)
        stats = rank_statistics(queries, candidates, positives, ks=ks, backend="torch")
        _, top = similarity_topk(queries, candidates, pool, backend="torch")
        for column, k in enumerate(ks):
            # Recall@k from the top-k list: a positive among the first k after dropping the other positives' slots.
            hit = []
            for row in range(rows):
                pos = {p for p in positives[row].tolist() if p >= 0}
                order = top[row].tolist()
                first = min(order.index(p) for p in pos)
                negatives_ahead = sum(1 for c in order[:first] if c not in pos)
                hit.append(negatives_ahead + 1 <= k)
            assert stats.hits[:, column].tolist() == hit


def test_one_dimensional_positives_and_no_negatives():
    q, c = torch.randn(2, 4), torch.randn(3, 4)
    stats = rank_statistics(q, c, torch.tensor([0, 2]), exclude=torch.tensor([[1, 2], [0, 1]]), backend="torch")
    assert stats.rank.tolist() == [1, 1]
    assert torch.isinf(stats.max_neg_score).all() and torch.isinf(stats.margin).all()


def test_opcheck_and_compile():
    q, c = torch.randn(4, 8), torch.randn(30, 8)
    positives = torch.tensor([[1, -1], [2, 3], [0, 0], [29, -1]])
    op = torch.ops.elva.rank_statistics_torch.default
    torch.library.opcheck(op, (q, c, positives, "cosine", None))
    torch.library.opcheck(op, (q, c, positives, "dot", torch.tensor([[5, -1]] * 4)))
    compiled = torch.compile(lambda q, c: rank_statistics(q, c, positives).rank, fullgraph=True)
    assert torch.equal(compiled(q, c), rank_statistics(q, c, positives).rank)
