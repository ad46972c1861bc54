"""A5 mine_hard_negatives: every backend beside torch topk(q @ c.T) plus random keys."""

OP = "mine_hard_negatives"


def test_mine_hard_negatives(benchmark, provider):
    benchmark.group = OP
    benchmark(provider.fn)
