"""SPEC's common input rules: each class of bad input raises, names the argument, and writes nothing, on every
backend the registry lists for the op: on CPU tensors for those that serve CPU (torch, the C++ ``cpu`` backend,
Triton under the interpreter), on CUDA tensors for those that serve CUDA."""
import re

import pytest
import torch

from elva_kernels import _dispatch, _library, l2_normalize, mine_hard_negatives, rank_statistics, similarity_topk
from tests.helpers import backend_matrix, require_backend

Q, C = torch.randn(4, 8), torch.randn(20, 8)
POS = torch.tensor([0, 1, 2, 3])
NAN = torch.randn(20, 8).index_fill_(0, torch.tensor([5]), float("nan"))
INF = torch.randn(4, 8).index_fill_(0, torch.tensor([1]), float("inf"))


def topk(queries, candidates, k, **kw):
    return similarity_topk(queries, candidates, k, **kw)


def stats(queries, candidates, positives, **kw):
    return rank_statistics(queries, candidates, positives, **kw)


def mine(query_emb, pool_emb, positives, **kw):
    return mine_hard_negatives(query_emb, pool_emb, positives, **kw)


def normalize(x, **kw):
    return l2_normalize(x, **kw)


# Each call's op and good arguments; a row of CASES replaces some of them.
OPS = {
    topk: ("similarity_topk", {"queries": Q, "candidates": C, "k": 3}),
    stats: ("rank_statistics", {"queries": Q, "candidates": C, "positives": POS}),
    mine: ("mine_hard_negatives", {"query_emb": Q, "pool_emb": C, "positives": POS, "n_hard": 2, "n_random": 2}),
    normalize: ("l2_normalize", {"x": C}),
}

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


def backend_cases():
    """Each row on each (backend, device) of its op's matrix; a row that sets ``backend`` itself runs once."""
    for i, (call, bad, error, words) in enumerate(CASES):
        op = OPS[call][0]
        once = [pytest.param("torch", "cpu", id="torch-cpu")]
        for pair in once if "backend" in bad else backend_matrix(op, reference=True):
            yield pytest.param(*pair.values, call, bad, error, words, marks=pair.marks,
                               id=f"{pair.id}-{call.__name__}-{'-'.join(bad)}-{i}")


def on(device, value):
    """``value`` moved to ``device``; meta tensors stay where they are (they are the bad device)."""
    return value.to(device) if isinstance(value, torch.Tensor) and value.device.type != "meta" else value


@pytest.mark.parametrize("backend, device, call, bad, error, words", list(backend_cases()))
def test_bad_input_is_refused_by_name(backend, device, call, bad, error, words):
    op, good = OPS[call]
    require_backend(op, backend, device)
    args = {name: on(device, value) for name, value in (good | bad).items()}
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(error) as raised:
        call(**({"backend": backend} | args))
    assert words in str(raised.value), str(raised.value)
    for name, original in before.items():
        assert torch.equal(args[name].nan_to_num(), original.nan_to_num()), f"{name} was modified"


def no_cpu_backends():
    for call, (op, _) in OPS.items():
        for backend in _dispatch.backends(op):
            if "cpu" not in backend.devices:
                yield pytest.param(call, backend.name, id=f"{backend.name}-{call.__name__}")


@pytest.mark.parametrize("call, backend", list(no_cpu_backends()))
def test_refused_backend_lists_inputs_and_reasons(call, backend):
    """A registered backend asked to run on CPU tensors it does not serve names the op, the inputs and why."""
    op, good = OPS[call]
    with pytest.raises(ValueError) as raised:
        call(**good, backend=backend)
    text = str(raised.value)
    assert f"backend {backend!r} cannot run {op} with inputs" in text, text
    c_name = next(name for name, value in good.items() if value is C)
    assert re.search(rf"\b{c_name}\s+\(20, 8\)", text), text
    assert "device type 'cpu' not supported" in text, text


def unregistered_backends():
    for call, (op, _) in OPS.items():
        registered = {b.name for b in _dispatch.backends(op)}
        for backend in _library.BACKENDS:
            if backend not in registered:
                yield pytest.param(call, backend, id=f"{backend}-{call.__name__}")


@pytest.mark.parametrize("call, backend", list(unregistered_backends()))
def test_unregistered_backend_is_refused_by_name(call, backend):
    """A backend name the op does not register (mine_hard_negatives has no C++ ``cpu`` one) is refused by name."""
    op, good = OPS[call]
    with pytest.raises(ValueError, match=f"{op} has no {backend!r} backend"):
        call(**good, backend=backend)
