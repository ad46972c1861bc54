"""A4 infonce_loss, forward + backward: every backend beside torch's materialising mm + cross-entropy."""

OP = "infonce_loss"


def test_infonce_loss(benchmark, provider):
    benchmark.group = OP
    benchmark(provider.fn)
