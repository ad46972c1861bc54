"""Stage 3's generative embedding: completion bookkeeping, KV-cache generation against the teacher-forced forward,
padding invariance, sampling, and evaluation through [RET]."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from elva.generative import _completions, encoder_for, generate_embed, score_completions, teach_summaries
from elva.model import RET_TOKEN, ElvaEmbedder

RET, END, PAD = 9, 7, 0


@pytest.fixture(scope="module")
def model() -> ElvaEmbedder:
    return ElvaEmbedder.tiny(seed=3, lora_r=4)


def _items():
    return [
        "a small red circle in the top left corner",
        (Image.new("RGB", (56, 56), (200, 30, 30)), "make the circle green"),
        Image.new("RGB", (84, 56), (10, 10, 220)),
        "two green triangles",
    ]


def test_completions_from_generated_tokens():
    new = torch.tensor([
        [5, 6, RET, PAD, PAD],  # [RET] generated: it is an action
        [5, END, PAD, PAD, PAD],  # <|im_end|>: replaced by [RET], not an action
        [5, 6, 5, 6, 5],  # the cap: [RET] appended after the last token
        [RET, PAD, PAD, PAD, PAD],  # an empty summary
    ])
    ids, mask, ret_index = _completions(new, RET, [END], PAD)
    assert ret_index.tolist() == [2, 1, 5, 0]
    assert ids.tolist() == [[5, 6, RET, PAD, PAD, PAD], [5, RET, PAD, PAD, PAD, PAD], [5, 6, 5, 6, 5, RET],
                            [RET, PAD, PAD, PAD, PAD, PAD]]
    assert mask.tolist() == [[True, True, True, False, False, False], [True, False, False, False, False, False],
                             [True, True, True, True, True, False], [True, False, False, False, False, False]]


def test_greedy_log_probs_match_the_kv_cache_generation(model):
    """The teacher-forced forward sees the same positions as generate's cached steps: its log-probs of the greedy
    tokens equal log_softmax of the logits generate computed, with the suppressed tokens removed."""
    from transformers import GenerationConfig

    gen = generate_embed(model, _items(), ["Retrieve an image.", None, None, None], max_new_tokens=6)
    assert gen.completion_ids.shape[0] == 4
    assert bool((gen.completion_ids.gather(1, gen.ret_index[:, None]) == model.ret_token_id).all())
    prompt = {k: v for k, v in gen.prompt.items()}
    config = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=[model.ret_token_id],
                              pad_token_id=model.collator.pad_token_id,
                              suppress_tokens=model.suppressed_token_ids)
    with torch.no_grad():
        out = model._hf_model().generate(**prompt, generation_config=config, output_logits=True,
                                         return_dict_in_generate=True)
    logits = torch.stack(out.logits, 1).float()
    logits[:, :, model.suppressed_token_ids] = float("-inf")
    steps = logits.shape[1]
    expected = torch.log_softmax(logits, -1).gather(2, gen.completion_ids[:, :steps, None])[:, :, 0]
    mask = gen.completion_mask[:, :steps]
    torch.testing.assert_close(gen.logprobs[:, :steps][mask], expected[mask], rtol=1e-4, atol=1e-4)
    # Greedy: every sampled token is the argmax of its step's logits.
    argmax = logits.argmax(-1)
    assert bool((argmax[mask] == gen.completion_ids[:, :steps][mask]).all())


def test_batch_equals_one_by_one_and_is_deterministic(model):
    items = _items()
    batch = generate_embed(model, items, max_new_tokens=5)
    again = generate_embed(model, items, max_new_tokens=5)
    assert torch.equal(batch.embeddings, again.embeddings)
    for i, item in enumerate(items):
        alone = generate_embed(model, [item], max_new_tokens=5)
        n = int(alone.ret_index[0]) + 1
        assert alone.completion_ids[0, :n].tolist() == batch.completion_ids[i, :n].tolist()
        torch.testing.assert_close(alone.embeddings[0], batch.embeddings[i], rtol=1e-4, atol=1e-5)
    assert torch.allclose(batch.embeddings.norm(dim=1), torch.ones(4))


def test_sampling_is_seeded_and_scores_under_the_temperature(model):
    torch.manual_seed(0)
    a = generate_embed(model, _items() * 4, sample=True, temperature=0.7, max_new_tokens=5)
    torch.manual_seed(0)
    b = generate_embed(model, _items() * 4, sample=True, temperature=0.7, max_new_tokens=5)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert a.completion_ids.unique().numel() > 4  # not greedy
    banned = torch.tensor(model.suppressed_token_ids)
    assert not bool(torch.isin(a.completion_ids[a.completion_mask], banned).any())
    logprobs, embeddings = score_completions(model, a.prompt, a.completion_ids, a.ret_index, temperature=0.7)
    torch.testing.assert_close(torch.where(a.completion_mask, logprobs, 0.0), a.logprobs)
    torch.testing.assert_close(embeddings, a.embeddings)
    hotter, _ = score_completions(model, a.prompt, a.completion_ids, a.ret_index, temperature=1.5)
    assert not torch.allclose(hotter[a.completion_mask], a.logprobs[a.completion_mask])


def test_score_completions_has_gradients_to_the_adapters(model):
    gen = generate_embed(model, _items()[:2], max_new_tokens=3)
    logprobs, embeddings = score_completions(model, gen.prompt, gen.completion_ids, gen.ret_index)
    (logprobs.sum() + embeddings.sum()).backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    model.zero_grad(set_to_none=True)


def test_teach_summaries_against_a_forward_by_hand(model):
    """The cold start's teacher-forced summaries: per item, the NLL of ``summary [RET]`` after the generative prompt
    and the hidden state at ``[RET]``, from one unpadded forward by hand; summaries are cut to the cap minus one."""
    items = _items()
    summaries = ["a small red circle", "one green circle at the top left on a white background", "blue", ""]
    model.config.generative_max_new_tokens = 6
    nll, embeddings = teach_summaries(model, items, None, summaries)
    hf, tokenizer = model._hf_model(), model.tokenizer
    total, count = 0.0, 0
    for row, (item, summary) in enumerate(zip(items, summaries)):
        prompt = model.collator([item], generative=True)
        summary_ids = tokenizer(summary, add_special_tokens=False)["input_ids"][:5] + [model.ret_token_id]
        ids = torch.cat([prompt["input_ids"], torch.tensor([summary_ids])], 1)
        extra = {k: prompt[k] for k in ("pixel_values", "image_grid_thw") if k in prompt}
        with torch.no_grad():
            hidden = hf.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                              mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"],
                                                           torch.zeros(1, len(summary_ids), dtype=torch.long)], 1),
                              **extra).last_hidden_state[0]
            logits = hf.lm_head(hidden).float()
        logits[:, model.suppressed_token_ids] = float("-inf")
        width = prompt["input_ids"].shape[1]
        logprobs = torch.log_softmax(logits[width - 1:-1], -1)[torch.arange(len(summary_ids)), summary_ids]
        total, count = total - float(logprobs.sum()), count + len(summary_ids)
        torch.testing.assert_close(embeddings[row], torch.nn.functional.normalize(hidden[-1], dim=0),
                                   atol=1e-5, rtol=0)
    assert nll.item() == pytest.approx(total / count, rel=1e-5)
    nll.backward()  # the cold start trains on it
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.trainable_parameters())
    model.zero_grad(set_to_none=True)


def test_arguments_are_checked(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_embed(model, ["x"], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate_embed(model, ["x"], sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="extraction"):
        encoder_for(model, "mean")
    assert encoder_for(model) is model  # the tiny model's own extraction is <emb>
    assert RET_TOKEN in model.tokenizer.get_vocab()


def test_evaluation_through_ret(model, tmp_path):
    from elva.data.synthetic import make_multigrain
    from elva.eval import evaluate

    root = tmp_path / "data"
    make_multigrain(root, seed=1, scenes=12)
    model.config.generative_max_new_tokens = 3
    result = evaluate(model, root, tmp_path / "eval", progress=False, plots=False, extraction="generative")
    assert result["multigrain"] and 0.0 <= result["multigrain"][-1]["R@5"] <= 1.0
    assert result["grains"]
