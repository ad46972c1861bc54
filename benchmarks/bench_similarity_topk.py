"""A1 similarity_topk: every backend beside torch.topk(q @ c.T), the bare q @ c.T and faiss-cpu."""

OP = "similarity_topk"


def test_similarity_topk(benchmark, provider):
    benchmark.group = OP
    benchmark(provider.fn)
