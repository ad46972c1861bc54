"""The TRL reward function and ``rewards_for_groups``: exact agreement with ``elva_rewards``, and a real
GRPOTrainer run on CPU (skipped without TRL)."""
import math

import pytest
import torch

from elva_kernels import elva_rewards
from elva_kernels.integrations import elva_reward_function, rewards_for_groups

DIM = 32


def embed(texts):
    """Deterministic toy embedder: hashed character bigrams, L2-normalised."""
    out = torch.zeros(len(texts), DIM)
    for i, text in enumerate(texts):
        for a, b in zip(" " + text, text):
            out[i, (ord(a) * 31 + ord(b)) % DIM] += 1.0
    return torch.nn.functional.normalize(out + 1e-3, dim=-1)


def trl_batch(rows, completions):
    """What GRPOTrainer passes: each row repeated once per completion of its group, consecutively."""
    prompts, positive, negatives, flat = [], [], [], []
    for row, group in zip(rows, completions):
        for completion in group:
            prompts.append(row["prompt"])
            positive.append(row["positive"])
            negatives.append(row["negatives"])
            flat.append(completion)
    return prompts, flat, {"positive": positive, "negatives": negatives}


ROWS = [
    {"prompt": "find red circle", "positive": "a red circle on the left",
     "negatives": ["a blue circle", "a red square"]},
    {"prompt": "find big square", "positive": "a large green square",
     "negatives": ["a small green square", "a big cat"]},
]
COMPLETIONS = [
    ["red circle left", "circle", "a red square"],
    ["large green square", "small square", "green"],
]


def expected_per_row(rows, completions, field="total", **options):
    """elva_rewards on each row alone, with no padding: the reference for the flattened TRL order."""
    out = []
    for row, group in zip(rows, completions):
        query = embed(list(group)).unsqueeze(0)
        cands = embed([row["positive"], *row["negatives"]]).unsqueeze(0)
        result = elva_rewards(query, cands, positive_index=0, advantage="none", **options)
        out += getattr(result, field).flatten().tolist()
    return out


def test_matches_elva_rewards_in_trl_order():
    prompts, completions, columns = trl_batch(ROWS, COMPLETIONS)
    reward = elva_reward_function(embed)
    got = reward(prompts, completions, **columns)
    # The same as one batched call on hand-built [B, G, d] / [B, C, d] tensors.
    query = torch.stack([embed(group) for group in COMPLETIONS])
    cands = torch.stack([embed([r["positive"], *r["negatives"]]) for r in ROWS])
    want = elva_rewards(query, cands, positive_index=0).total.flatten().tolist()
    assert got == pytest.approx(want, abs=1e-6)
    assert got == pytest.approx(expected_per_row(ROWS, COMPLETIONS), abs=1e-6)
    assert all(isinstance(value, float) for value in got)
    assert reward.__name__ == "elva_reward"


def test_ragged_negatives_are_masked():
    rows = [
        {"prompt": "p0", "positive": "a red circle", "negatives": ["a blue circle"]},
        {"prompt": "p1", "positive": "a green square",
         "negatives": ["a green circle", "a red square", "a tiny square"]},
        {"prompt": "p2", "positive": "a dog", "negatives": "a cat"},  # a single string is one negative
    ]
    completions = [["red circle", "blue"], ["green square", "square red"], ["dog", "cat"]]
    prompts, flat, columns = trl_batch(rows, completions)
    got = elva_reward_function(embed)(prompts, flat, **columns)
    rows[2]["negatives"] = ["a cat"]
    assert got == pytest.approx(expected_per_row(rows, completions), abs=1e-6)


def test_conversational_completions_use_last_message():
    prompts, completions, columns = trl_batch(ROWS, COMPLETIONS)
    chat = [[{"role": "assistant", "content": text}] for text in completions]
    chat[0] = [{"role": "assistant", "content": "ignored"}, {"role": "assistant", "content": completions[0]}]
    chat[1] = [{"role": "assistant", "content": [{"type": "text", "text": completions[1]}]}]
    reward = elva_reward_function(embed)
    assert reward(prompts, chat, **columns) == pytest.approx(reward(prompts, completions, **columns), abs=1e-6)


def test_unequal_groups_and_repeated_candidates():
    # Groups of 3 and 2 (e.g. a process's slice cut a group), and a third row whose candidates equal the first's.
    completions = [COMPLETIONS[0], COMPLETIONS[1][:2], ["circle on the left"]]
    rows = ROWS + [dict(ROWS[0], prompt="another prompt")]
    prompts, flat, columns = trl_batch(rows, completions)
    got = elva_reward_function(embed)(prompts, flat, **columns)
    assert got == pytest.approx(expected_per_row(rows, completions), abs=1e-6)


@pytest.mark.parametrize("field", ["margin", "rank_reward"])
def test_reward_field_and_options(field):
    prompts, completions, columns = trl_batch(ROWS, COMPLETIONS)
    reward = elva_reward_function(embed, reward=field, delta=0.0, gamma=0.05)
    assert reward.__name__ == f"elva_{field}"
    want = expected_per_row(ROWS, COMPLETIONS, field, delta=0.0, gamma=0.05)
    assert reward(prompts, completions, **columns) == pytest.approx(want, abs=1e-6)
    # alpha / eps reach the op: total is then exactly the margin.
    only_margin = elva_reward_function(embed, alpha=1.0, eps=0.0)(prompts, completions, **columns)
    assert only_margin == pytest.approx(expected_per_row(ROWS, COMPLETIONS, "margin"), abs=1e-6)


def test_custom_columns_name_numpy_embedder_and_log_metric():
    prompts, completions, columns = trl_batch(ROWS, COMPLETIONS)
    logged = {}
    reward = elva_reward_function(
        lambda texts: embed(texts).double().numpy(), positive_column="pos", negatives_column="negs", name="retrieval"
    )
    got = reward(prompts, completions, pos=columns["positive"], negs=columns["negatives"],
                 log_metric=lambda key, value: logged.__setitem__(key, value), trainer_state=None)
    assert reward.__name__ == "retrieval"
    assert got == pytest.approx(expected_per_row(ROWS, COMPLETIONS), abs=1e-5)
    ranks = torch.cat([
        elva_rewards(embed(group).unsqueeze(0), embed([row["positive"], *row["negatives"]]).unsqueeze(0)).rank
        for row, group in zip(ROWS, COMPLETIONS)
    ], 1)
    assert logged == {"retrieval/positive_rank": pytest.approx(ranks.double().mean().item())}
    assert reward([], [], pos=[], negs=[]) == []


def test_errors():
    prompts, completions, columns = trl_batch(ROWS, COMPLETIONS)
    with pytest.raises(ValueError, match="reward must be one of"):
        elva_reward_function(embed, reward="advantages")
    with pytest.raises(TypeError, match="sets"):
        elva_reward_function(embed, mask=None)
    with pytest.raises(KeyError, match="no column 'negatives'"):
        elva_reward_function(embed)(prompts, completions, positive=columns["positive"])
    with pytest.raises(ValueError, match="no negatives"):
        elva_reward_function(embed)(["p"], ["c"], positive=["a"], negatives=[[]])
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        elva_reward_function(lambda texts: torch.zeros(len(texts)))(prompts, completions, **columns)


def test_rewards_for_groups():
    torch.manual_seed(0)
    queries, group, count, dim = 3, 4, 6, 16
    flat = torch.randn(queries * group, dim)
    shared = torch.randn(queries, count, dim)
    out = rewards_for_groups(flat, shared, group, alpha=0.5)
    want = elva_rewards(flat.view(queries, group, dim), shared, alpha=0.5)
    for got_field, want_field in zip(out, want):
        if want_field is not None:
            torch.testing.assert_close(got_field, want_field)
    # One candidate set per completion, with a [B*G, C] mask.
    per_completion = torch.randn(queries * group, count, dim)
    mask = torch.ones(queries * group, count, dtype=torch.bool)
    mask[::2, -1] = False
    out = rewards_for_groups(flat, per_completion, group, mask=mask, advantage="none")
    want = elva_rewards(flat.view(queries, group, dim), per_completion.view(queries, group, count, dim),
                        mask=mask.view(queries, group, count), advantage="none")
    torch.testing.assert_close(out.total, want.total)
    torch.testing.assert_close(out.advantages, want.advantages)
    with pytest.raises(ValueError, match="multiple of group_size"):
        rewards_for_groups(flat[:5], shared, group)
    with pytest.raises(ValueError, match="candidate sets"):
        rewards_for_groups(flat, shared[:2], group)


def _tiny_causal_lm():
    """A randomly initialised 2-layer Llama with a word-level tokenizer built in-process (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "a the find image of with red green blue circle square small large left right on".split()
    vocab = {word: i for i, word in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tokenizer


def test_grpo_trainer_logs_elva_rewards(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    colours, shapes = ["red", "green", "blue"], ["circle", "square", "small"]
    rows = []
    for i, (colour, shape) in enumerate([(c, s) for c in colours for s in shapes][:8]):
        others = [other for other in colours if other != colour]
        rows.append({
            "prompt": f"find the {colour} {shape}",
            "positive": f"a {colour} {shape}",
            "negatives": [f"a {other} {shape}" for other in others][: 1 + i % 2],  # ragged
        })
    calls = []

    def recording_embed(texts):
        calls.append(list(texts))
        return embed(texts)

    model, tokenizer = _tiny_causal_lm()
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=8, logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
        disable_tqdm=True, seed=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=elva_reward_function(recording_embed), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )
    trainer.train()

    key = "rewards/elva_reward/mean"
    logged = [entry[key] for entry in trainer.state.log_history if key in entry]
    assert len(logged) == 2 and all(math.isfinite(value) for value in logged)
    assert all(math.isfinite(entry["elva_reward/positive_rank"]) for entry in trainer.state.log_history
               if "elva_reward/positive_rank" in entry)
    # Two embed calls per generation batch: whole groups of completions (2 prompts x 4 here), then the candidates.
    assert calls and len(calls) % 2 == 0 and all(len(c) % 4 == 0 for c in calls[::2])
    assert all(set(candidates) <= {r["positive"] for r in rows} | {n for r in rows for n in r["negatives"]}
               for candidates in calls[1::2])
