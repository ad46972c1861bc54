"""A3 elva_rewards: every backend beside the torch way (einsum + argsort) and the read-once floor."""

OP = "elva_rewards"


def test_elva_rewards(benchmark, provider):
    benchmark.group = OP
    benchmark(provider.fn)
