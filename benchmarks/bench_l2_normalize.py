"""l2_normalize: every backend beside F.normalize(x.float())."""

OP = "l2_normalize"


def test_l2_normalize(benchmark, provider):
    benchmark.group = OP
    benchmark(provider.fn)
