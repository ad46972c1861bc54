"""SPEC's common input rules: each class of bad input raises, names the argument, and writes nothing, on every
backend that serves the op on CPU tensors (torch, the C++ ``cpu`` backend, Triton under the interpreter)."""
import pytest
import torch

from elva_kernels import _dispatch, l2_normalize, mine_hard_negatives, rank_statistics, similarity_topk
from tests.helpers import backend_or_skip

Q, C = torch.randn(4, 8), torch.randn(20, 8)
POS = torch.tensor([0, 1, 2, 3])
NAN = torch.randn(20, 8).index_fill_(0, torch.tensor([5]), float("nan"))
INF = torch.randn(4, 8).index_fill_(0, torch.tensor([1]), float("inf"))


def topk(**kw):
    args = {"queries": Q, "candidates": C, "k": 3, "backend": "torch"} | kw
    return similarity_topk(args.pop("queries"), args.pop("candidates"), args.pop("k"), **args)


def stats(**kw):
    args = {"queries": Q, "candidates": C, "positives": POS, "backend": "torch"} | kw
    return rank_statistics(args.pop("queries"), args.pop("candidates"), args.pop("positives"), **args)


def mine(**kw):
    args = {"query_emb": Q, "pool_emb": C, "positives": POS, "n_hard": 2, "n_random": 2, "backend": "torch"} | kw
    return mine_hard_negatives(args.pop("query_emb"), args.pop("pool_emb"), args.pop("positives"), **args)


def normalize(**kw):
    args = {"x": C, "backend": "torch"} | kw
    return l2_normalize(args.pop("x"), **args)


CASES = [
    # (call, bad arguments, error type, words the message must contain)
    (topk, {"queries": torch.randn(4, 8, 1)}, ValueError, "queries must be a 2-D tensor"),
    (topk, {"candidates": torch.randn(20, 7)}, ValueError, "candidates must be [N, d] with the queries' d"),
    (topk, {"queries": Q.double()}, TypeError, "queries must have dtype"),
    (topk, {"candidates": C.int()}, TypeError, "candidates must have dtype"),
    (topk, {"candidates": C.half()}, TypeError, "embeddings must share one dtype"),
    (topk, {"candidates": torch.randn(20, 8, device="meta")}, ValueError, "one device"),
    (topk, {"k": 0}, ValueError, "k must be >= 1"),
    (topk, {"k": 21}, ValueError, "k must be >= 1 and <= 20"),
    (topk, {"k": 2.0}, TypeError, "k must be an int"),
    (topk, {"exclude": torch.tensor([[20]] * 4)}, ValueError, "exclude holds ids outside"),
    (topk, {"exclude": torch.tensor([[-2]] * 4)}, ValueError, "exclude holds ids outside"),
    (topk, {"exclude": torch.tensor([[1]] * 3)}, ValueError, "exclude must be int64 [B, m] with one row per query"),
    (topk, {"exclude": torch.tensor([[1]] * 4, dtype=torch.int32)}, TypeError, "exclude must have dtype"),
    (topk, {"candidates": NAN}, ValueError, "candidates must contain only finite values"),
    (topk, {"queries": INF}, ValueError, "queries must contain only finite values"),
    (topk, {"queries": torch.randn(0, 8)}, ValueError, "queries must not be empty"),
    (topk, {"candidates": torch.randn(0, 8)}, ValueError, "candidates must not be empty"),
    (topk, {"metric": "l2"}, ValueError, "metric must be one of"),
    (topk, {"max_score": torch.zeros(3)}, ValueError, "max_score must be a float or a float tensor [4]"),
    (topk, {"max_score": "high"}, TypeError, "max_score must be a float"),
    (topk, {"backend": "gpu"}, ValueError, "backend must be one of"),
    (stats, {"positives": torch.tensor([0, 1, 2, 20])}, ValueError, "positives holds ids outside"),
    (stats, {"positives": torch.tensor([[0], [1], [-1], [3]])}, ValueError, "positives must list at least one"),
    (stats, {"positives": POS[:3]}, ValueError, "positives must be int64 [B] or [B, m] with one row per query"),
    (stats, {"positives": POS.float()}, TypeError, "positives must have dtype"),
    (stats, {"ks": ()}, TypeError, "ks must be a non-empty sequence"),
    (stats, {"ks": (1, 0)}, ValueError, "ks must be >= 1"),
    (stats, {"candidates": NAN}, ValueError, "candidates must contain only finite values"),
    (stats, {"candidates": torch.randn(20, 9)}, ValueError, "candidates must be [N, d]"),
    (stats, {"queries": torch.randn(4, 8, device="meta")}, ValueError, "one device"),
    (stats, {"exclude": torch.tensor([[99]] * 4)}, ValueError, "exclude holds ids outside"),
    (mine, {"n_hard": -1}, ValueError, "n_hard must be >= 0"),
    (mine, {"n_hard": 0, "n_random": 0}, ValueError, "n_hard + n_random must be >= 1"),
    (mine, {"seed": -3}, ValueError, "seed must be >= 0"),
    (mine, {"pool_emb": NAN}, ValueError, "pool_emb must contain only finite values"),
    (mine, {"positives": torch.tensor([0, 1, 2, 99])}, ValueError, "positives holds ids outside"),
    (mine, {"pool_emb": torch.randn(20, 3)}, ValueError, "pool_emb must be [N, d] with query_emb's d"),
    (mine, {"query_emb": torch.randn(4, 8, dtype=torch.float64)}, TypeError, "query_emb must have dtype"),
    (normalize, {"x": torch.randn(3)}, ValueError, "x must be a 2-D tensor"),
    (normalize, {"x": NAN}, ValueError, "x must contain only finite values"),
    (normalize, {"eps": 0.0}, ValueError, "eps must be a finite float > 0"),
    (normalize, {"x": torch.randn(0, 4)}, ValueError, "x must not be empty"),
]


OPS = {topk: "similarity_topk", stats: "rank_statistics", mine: "mine_hard_negatives", normalize: "l2_normalize"}
CPU_BACKENDS = ("torch", "cpu", "triton")


def backend_cases():
    """Each row on each backend its op registers; a row that sets ``backend`` itself runs once."""
    for i, (call, bad, error, words) in enumerate(CASES):
        registered = [b.name for b in _dispatch.backends(OPS[call])]
        for backend in ("torch",) if "backend" in bad else [b for b in CPU_BACKENDS if b in registered]:
            yield pytest.param(backend, call, bad, error, words, id=f"{backend}-{call.__name__}-{'-'.join(bad)}-{i}")


@pytest.mark.parametrize("backend, call, bad, error, words", list(backend_cases()))
def test_bad_input_is_refused_by_name(backend, call, bad, error, words):
    # A backend that cannot run the op on CPU fp32 here at all (e.g. Triton without TRITON_INTERPRET) is skipped
    # with the dispatcher's reasons.
    backend_or_skip(OPS[call], backend, "cpu", torch.float32)
    before = {k: v.clone() for k, v in bad.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(error) as raised:
        call(**({"backend": backend} | bad))
    assert words in str(raised.value), str(raised.value)
    for name, original in before.items():
        assert torch.equal(bad[name].nan_to_num(), original.nan_to_num()), f"{name} was modified"


def test_refused_backend_lists_inputs_and_reasons():
    with pytest.raises(ValueError) as raised:
        similarity_topk(Q, C, 3, backend="cuda")
    text = str(raised.value)
    assert "backend 'cuda'" in text or "has no 'cuda' backend" in text
    with pytest.raises(ValueError) as raised:
        l2_normalize(C, backend="cuda")
    assert "backend 'cuda' cannot run l2_normalize" in str(raised.value)
    assert "x " in str(raised.value) and "(20, 8)" in str(raised.value)
    assert "device type 'cpu' not supported" in str(raised.value)
