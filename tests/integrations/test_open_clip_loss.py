"""The open_clip ClipLoss drop-in against a faithful fp64 reference of open_clip's ClipLoss (open_clip
itself is not installed: it needs torchvision). The reference mirrors open_clip's ``gather_features``
(torch.distributed branch), ``get_logits`` (with the newer ``logit_bias``) and ``forward``."""
import math

import pytest
import torch
import torch.nn.functional as F

from elva_kernels.integrations.open_clip import ClipLoss
from tests.helpers import spawn_gloo

DIM = 32


def reference_gather(image_features, text_features, local_loss, gather_with_grad, rank, world_size):
    """open_clip.loss.gather_features, torch.distributed branch."""
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401

    if gather_with_grad:
        return (torch.cat(torch.distributed.nn.all_gather(image_features), dim=0),
                torch.cat(torch.distributed.nn.all_gather(text_features), dim=0))
    images = [torch.zeros_like(image_features) for _ in range(world_size)]
    texts = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(images, image_features)
    dist.all_gather(texts, text_features)
    if not local_loss:
        images[rank] = image_features
        texts[rank] = text_features
    return torch.cat(images, dim=0), torch.cat(texts, dim=0)


def reference_clip_loss(image_features, text_features, logit_scale, logit_bias=None, output_dict=False, *,
                        local_loss=False, gather_with_grad=False, rank=0, world_size=1):
    """open_clip.loss.ClipLoss.forward: dot-product logits (the features come normalised)."""
    if world_size > 1:
        all_images, all_texts = reference_gather(
            image_features, text_features, local_loss, gather_with_grad, rank, world_size)
        if local_loss:
            logits_per_image = logit_scale * image_features @ all_texts.T
            logits_per_text = logit_scale * text_features @ all_images.T
        else:
            logits_per_image = logit_scale * all_images @ all_texts.T
            logits_per_text = logits_per_image.T
    else:
        logits_per_image = logit_scale * image_features @ text_features.T
        logits_per_text = logit_scale * text_features @ image_features.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device)
    if world_size > 1 and local_loss:
        labels = labels + logits_per_image.shape[0] * rank
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return {"contrastive_loss": loss} if output_dict else loss


def features(batch, seed, normalise=True):
    g = torch.Generator().manual_seed(seed)
    image, text = torch.randn(batch, DIM, generator=g), torch.randn(batch, DIM, generator=g)
    text = text + 0.5 * image  # correlated pairs, so the loss is not trivially log(B)
    if normalise:
        image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    return image, text


def run(loss_fn, image, text, log_scale, fp64=False, model_normalises=True, **kwargs):
    """Loss and gradients wrt both features and the (log) logit scale, open_clip-style: the model's
    raw outputs are the leaves, the model L2-normalises them (``model_normalises``), scale = exp(param).

    The gradients are taken at the raw outputs, as they reach the model: there both losses agree
    exactly. At the normalised features themselves they differ by a radial component (ours is the
    cosine's gradient, tangent to the sphere; open_clip's dot-product gradient is not), which the
    model's own F.normalize removes.
    """
    image = image.clone().requires_grad_()
    text = text.clone().requires_grad_()
    param = torch.tensor(log_scale, requires_grad=True)
    cast = (lambda t: t.double()) if fp64 else (lambda t: t)
    norm = (lambda t: F.normalize(t, dim=-1)) if model_normalises else (lambda t: t)
    loss = loss_fn(norm(cast(image)), norm(cast(text)), cast(param).exp(), **kwargs)
    value = loss["contrastive_loss"] if isinstance(loss, dict) else loss
    grads = torch.autograd.grad(value, (image, text, param))
    return value.detach().double(), [g.double() for g in grads], loss


def assert_matches(ours, ref, what=""):
    (loss, grads, _), (ref_loss, ref_grads, _) = ours, ref
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()) + 1e-7, (what, loss, ref_loss)
    for name, g, r in zip(("image", "text", "logit_scale"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * r.abs().max().item() + 1e-9, msg=f"{what} {name}")


LOG_SCALE = math.log(1 / 0.07)


@pytest.mark.parametrize("batch", [8, 17, 64])
def test_matches_reference(batch):
    image, text = features(batch, seed=batch)
    ours = run(ClipLoss(), image, text, LOG_SCALE)
    ref = run(reference_clip_loss, image, text, LOG_SCALE, fp64=True)
    assert ours[0].item() > 0.01 and ours[2].dtype == torch.float32
    assert_matches(ours, ref, f"B={batch}")
    assert ours[1][2].abs().item() > 0, "logit_scale must receive a gradient"


def test_output_dict_and_bias():
    image, text = features(16, seed=1)
    bias = torch.tensor(-10.0, requires_grad=True)
    # Reference semantics: a constant bias on every logit leaves the loss unchanged.
    ref_plain = run(reference_clip_loss, image, text, LOG_SCALE, fp64=True)
    ref_bias = run(reference_clip_loss, image, text, LOG_SCALE, fp64=True, logit_bias=bias.double())
    assert abs(ref_bias[0].item() - ref_plain[0].item()) < 1e-12
    ours = run(ClipLoss(), image, text, LOG_SCALE, logit_bias=bias, output_dict=True)
    assert set(ours[2]) == {"contrastive_loss"}
    assert_matches(ours, ref_bias, "bias + output_dict")
    # The bias stays in the graph with a zero gradient, as in open_clip.
    loss = ClipLoss()(image, text, torch.tensor(LOG_SCALE).exp(), logit_bias=bias)
    (grad_bias,) = torch.autograd.grad(loss, bias)
    assert grad_bias.item() == 0.0
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        ClipLoss()(image, text, 10.0, logit_bias=torch.zeros(2))


def test_float_scale_and_positional_call():
    image, text = features(8, seed=2)
    ours = ClipLoss()(image, text, 1 / 0.07)
    ref = reference_clip_loss(image.double(), text.double(), 1 / 0.07)
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    assert torch.is_tensor(ClipLoss()(image, text, torch.tensor([1 / 0.07]), None, False))


def test_unnormalised_features_give_the_cosine_loss():
    """Documented difference: we always normalise (open_clip would use raw dot products)."""
    image, text = features(12, seed=3, normalise=False)
    image, text = 3.0 * image, 0.5 * text
    ours = run(ClipLoss(), image, text, LOG_SCALE, model_normalises=False)
    cosine_ref = run(reference_clip_loss, image, text, LOG_SCALE, fp64=True)  # normalised before the loss
    assert_matches(ours, cosine_ref, "cosine")
    dot_ref = run(reference_clip_loss, image, text, LOG_SCALE, fp64=True, model_normalises=False)
    assert abs(ours[0].item() - dot_ref[0].item()) > 1e-3


def test_gradient_at_normalised_features_is_the_tangential_part():
    """Fed normalised leaves directly, our gradient is open_clip's with the radial part removed."""
    image, text = features(10, seed=5)
    ours = run(ClipLoss(), image, text, LOG_SCALE, model_normalises=False)
    ref = run(reference_clip_loss, image, text, LOG_SCALE, fp64=True, model_normalises=False)
    assert abs(ours[0].item() - ref[0].item()) <= 1e-5 * ref[0].item()
    for x, g, r in zip((image, text), ours[1][:2], ref[1][:2]):
        x = x.double()
        tangential = r - (r * x).sum(1, keepdim=True) * x
        torch.testing.assert_close(g, tangential, rtol=1e-5, atol=1e-5 * tangential.abs().max().item())


def test_unsupported_options():
    with pytest.raises(ValueError, match="horovod"):
        ClipLoss(use_horovod=True)
    image, text = features(4, seed=4)
    with pytest.raises(ValueError, match="initialised torch.distributed"):
        ClipLoss(rank=1, world_size=2)(image, text, 10.0)
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(image, text[:3], 10.0)


# ---- torch.distributed: 2 gloo ranks, ours against the reference on every rank ----

MODES = [(local, grad) for local in (False, True) for grad in (False, True)]


def _worker(rank, out_dir):
    results = {}
    world = 2
    for local_loss, gather_with_grad in MODES:
        image, text = features(6 * world, seed=11)  # the global batch; each rank holds its 6 rows
        image, text = image[rank * 6:(rank + 1) * 6], text[rank * 6:(rank + 1) * 6]
        options = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
        ours = run(ClipLoss(**options), image, text, LOG_SCALE)
        ref = run(lambda i, t, s: reference_clip_loss(i, t, s, **options), image, text, LOG_SCALE, fp64=True)
        results[(local_loss, gather_with_grad)] = (ours[0], ours[1], ref[0], ref[1])
    torch.save(results, out_dir / f"rank{rank}.pt")


def test_distributed_matches_reference(tmp_path):
    spawn_gloo(_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for mode in MODES:
        what = "local_loss={}, gather_with_grad={}".format(*mode)
        per_rank = [r[mode] for r in ranks]
        for loss, grads, ref_loss, ref_grads in per_rank:
            assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item() + 1e-7, (what, loss, ref_loss)
            for name, g, r in zip(("image", "text"), grads[:2], ref_grads[:2]):
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * r.abs().max().item(), msg=f"{what} {name}")
        scale_grads = [p[1][2] for p in per_rank]
        ref_scale_grads = [p[3][2] for p in per_rank]
        if mode == (False, True):
            # Each rank's logit_scale gradient is its share of the global loss's: equal after DDP's mean.
            scale_grads = [sum(scale_grads) / 2] * 2
        for g, r in zip(scale_grads, ref_scale_grads):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-9, msg=f"{what} logit_scale")
