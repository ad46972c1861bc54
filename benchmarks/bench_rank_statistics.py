"""A2 rank_statistics: every backend beside the materialised torch count and the bare q @ c.T."""

OP = "rank_statistics"


def test_rank_statistics(benchmark, provider):
    benchmark.group = OP
    benchmark(provider.fn)
