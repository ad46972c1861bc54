"""Stage 3 (GRPO): the loss against a hand-written computation, KL 0 at step 0, zero-variance groups, policy
improvement on fixed rollouts, the mean reward rising from the cold start, a run's logs and model, kill-and-resume,
torchrun and input errors."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import elva_kernels
from elva.config import load_config, save_config
from elva.train import checkpoint, run_grpo, run_stage, run_training
from elva.train.grpo import LOG_COLUMNS, RlDataset, collect_rollouts, grpo_loss, policy_loss, rollout_metrics
from tests.helpers import free_port, train_until_killed

REPO = Path(__file__).resolve().parents[2]
STAGE2 = REPO / "configs" / "tiny_stage2.yaml"
COLDSTART = REPO / "configs" / "tiny_coldstart.yaml"
STAGE3 = REPO / "configs" / "tiny_stage3.yaml"


# ---- the loss, by hand ---------------------------------------------------------------------------------------------
def _hand_loss_and_grad(new, old, ref, adv, mask, clip, beta, aggregation):
    """Loss and d loss / d new, written out token by token in Python floats."""
    n, width = len(new), len(new[0])
    lengths = [sum(mask[i]) for i in range(n)]
    total = sum(lengths)
    with_tokens = sum(1 for length in lengths if length > 0)
    loss, grad = 0.0, [[0.0] * width for _ in range(n)]
    for i in range(n):
        for t in range(width):
            if not mask[i][t]:
                continue
            weight = 1.0 / (with_tokens * lengths[i]) if aggregation == "sequence" else 1.0 / total
            ratio = math.exp(new[i][t] - old[i][t])
            a = adv[i]
            unclipped, clipped = ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a
            surrogate = min(unclipped, clipped)
            # d(-min)/d new: -ratio * a when the unclipped term is the min (or the ratio is inside the range).
            d_surrogate = -ratio * a if (unclipped <= clipped or 1 - clip < ratio < 1 + clip) else 0.0
            kl = math.exp(ref[i][t] - new[i][t]) - (ref[i][t] - new[i][t]) - 1
            d_kl = -math.exp(ref[i][t] - new[i][t]) + 1
            loss += weight * (-surrogate + beta * kl)
            grad[i][t] = weight * (d_surrogate + beta * d_kl)
    return loss, grad


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_grpo_loss_and_gradient_match_a_hand_computation(aggregation):
    g = torch.Generator().manual_seed(7)
    n, width = 5, 6
    old = -torch.rand(n, width, generator=g, dtype=torch.float64) * 3
    new = (old + 0.4 * torch.randn(n, width, generator=g, dtype=torch.float64)).requires_grad_()  # some clipped
    ref = old + 0.2 * torch.randn(n, width, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.3, -0.7, 0.0, 2.0, -1.1], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    loss, stats = grpo_loss(new, old, ref, adv, mask, clip=0.2, beta=0.3, aggregation=aggregation)
    loss.backward()
    hand, hand_grad = _hand_loss_and_grad(new.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                                          0.2, 0.3, aggregation)
    assert abs(loss.item() - hand) < 1e-12
    torch.testing.assert_close(new.grad, torch.tensor(hand_grad, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    ratio = (new - old).exp().detach()
    expected_clip = (((ratio < 0.8) & (adv[:, None] < 0)) | ((ratio > 1.2) & (adv[:, None] > 0)))[mask].double().mean()
    assert stats["clip_ratio"].item() == pytest.approx(expected_clip.item())
    assert 0 < stats["clip_ratio"].item() < 1


def test_zero_advantages_and_equal_policies_give_zero_loss():
    logprobs = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(logprobs, logprobs.detach(), logprobs.detach(), torch.zeros(3, dtype=torch.float64),
                            torch.ones(3, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and stats["kl"].item() == 0
    assert bool((logprobs.grad == 0).all())


def test_a_zero_variance_group_has_zero_advantages():
    """Equal rewards within a group (G identical rollouts, or G = 1) give advantages of exactly 0, never NaN."""
    g = torch.Generator().manual_seed(0)
    query = torch.randn(3, 1, 16, generator=g).expand(3, 4, 16).contiguous()  # 4 identical rollouts per query
    candidates = torch.randn(3, 9, 16, generator=g)
    rewards = elva_kernels.elva_rewards(query, candidates)
    assert bool((rewards.advantages == 0).all())
    single = elva_kernels.elva_rewards(query[:, :1], candidates)
    assert bool((single.advantages == 0).all())


# ---- on the tiny model ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage2(tmp_path_factory) -> tuple[Path, Path]:
    """Synthetic data and a briefly trained stage-2 model (the starting point of stage 3)."""
    from elva.data.synthetic import make_multigrain

    root = tmp_path_factory.mktemp("grpo")
    data = root / "data"
    make_multigrain(data, seed=0, scenes=40)
    model = run_training(load_config(STAGE2, [f"run_dir={root / 'stage2'}", "train.max_steps=60",
                                              "train.batch_size=16", "train.log_every=20", "train.save_every=60"],
                                     {"data_dir": str(data)}))
    return data, model


@pytest.fixture(scope="module")
def coldstart(stage2, tmp_path_factory) -> tuple[Path, Path]:
    """The generative cold start from that stage-2 model: stage 3's starting point in the demo."""
    data, model = stage2
    root = tmp_path_factory.mktemp("coldstart")
    return data, run_training(load_config(COLDSTART, [f"run_dir={root}", f"train.init_from={model}",
                                                      "train.max_steps=150", "train.log_every=50",
                                                      "train.save_every=150"], {"data_dir": str(data)}))


def _config(start, run_dir: Path, *overrides: str):
    """Stage 3 from ``start`` (data, model); summaries of the random-headed stage-2 model are capped at 4 tokens."""
    data, model = start
    return load_config(STAGE3, [f"run_dir={run_dir}", f"train.init_from={model}", "train.log_every=1",
                                "rl.n_hard=4", "rl.n_random=4", "rl.max_new_tokens=4", *overrides],
                       {"data_dir": str(data)})


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "logs.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_kl_is_zero_and_the_ratio_one_at_step_zero(stage2, tmp_path):
    from elva.train.loop import build_model

    config = _config(stage2, tmp_path / "run")
    torch.manual_seed(0)
    model = build_model(config)
    model.merge_lora().add_lora()
    model.eval()
    from elva.train.grpo import _mine_negatives

    negatives = _mine_negatives(model, config, tmp_path / "negatives.jsonl")
    dataset = RlDataset(config, negatives)
    examples = [dataset[(i, 0)] for i in range(3)]
    assert all(len(e.candidates) == 1 + 4 + 4 for e in examples)
    rollouts = collect_rollouts(model, examples, config.rl)
    loss, stats = policy_loss(model, rollouts, config.rl)
    assert stats["kl"].item() == 0.0  # fresh adapters: policy == reference
    assert stats["clip_ratio"].item() == 0.0
    metrics = rollout_metrics(rollouts)
    assert rollouts.rewards.total.shape == (3, config.rl.group_size)
    assert 1 <= metrics["positive_rank"].item() <= 9
    # The surrogate's value is -mean(A) = 0 per group; its gradient is not.
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.trainable_parameters())


def test_updates_move_probability_to_the_better_rollouts(stage2, tmp_path):
    """Policy improvement on one fixed batch: a few clipped-ratio updates raise the advantage-weighted mean
    log-probability of the rollouts (the direction GRPO is meant to move the policy)."""
    from elva.generative import score_completions
    from elva.train.grpo import _mine_negatives
    from elva.train.loop import build_model

    config = _config(stage2, tmp_path / "run", "rl.beta=0.0")
    torch.manual_seed(1)
    model = build_model(config)
    model.merge_lora().add_lora()
    model.eval()
    dataset = RlDataset(config, _mine_negatives(model, config, tmp_path / "negatives.jsonl"))
    rollouts = collect_rollouts(model, [dataset[(i, 0)] for i in range(4)], config.rl)
    generation = rollouts.generations[0]
    advantages = rollouts.rewards.advantages.flatten()
    mask = generation.completion_mask.double()

    def weighted() -> float:
        with torch.no_grad():
            logprobs, _ = score_completions(model, generation.prompt, generation.completion_ids,
                                            generation.ret_index, generation.temperature)
        per_sequence = (logprobs.double() * mask).sum(1) / mask.sum(1).clamp(min=1)
        return float((advantages.double() * per_sequence).mean())

    before = weighted()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    for _ in range(4):
        loss, _ = policy_loss(model, rollouts, config.rl)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert weighted() > before + 1e-3, (before, weighted())


def test_the_mean_reward_rises_from_the_cold_start(coldstart, tmp_path):
    """The acceptance claim, on a fixed seed: GRPO from the cold start raises the mean training reward. The same 16
    queries (4 per task) are rolled out at every step, so the reward moves with the policy, not with the queries
    drawn. Measured with this setting for seeds 0, 1 and 2: from 0.157, 0.137 and 0.135 over the first 5 steps to
    0.215, 0.205 and 0.206 over the last 10 (+0.058 to +0.072)."""
    run_dir = tmp_path / "run"
    run_grpo(_config(coldstart, run_dir, "rl.max_new_tokens=20", "data.query_fraction=0.15", "train.batch_size=16",
                     "train.max_steps=30", "train.lr=1e-3"))
    rewards = [float(row["reward"]) for row in _rows(run_dir)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    assert last > first + 0.03, rewards


def test_stage3_runs_logs_trl_metrics_and_saves_a_generative_model(stage2, tmp_path):
    run_dir = tmp_path / "run"
    out = run_grpo(_config(stage2, run_dir, "train.max_steps=12", "train.log_every=3", "train.save_every=6",
                           "data.query_fraction=0.01", "train.batch_size=4", "rl.aux_weight=1.0"))
    rows = _rows(run_dir)
    assert list(rows[0]) == list(LOG_COLUMNS) and len(rows) == 4
    assert all(0 <= float(r["frac_reward_zero_std"]) <= 1 and float(r["completion_length"]) > 0 for r in rows)
    assert float(rows[0]["kl"]) < float(rows[-1]["kl"])  # the policy moved away from the reference
    samples = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert samples and {"step", "qid", "summary", "reward", "advantage", "positive_rank"} <= set(samples[0])
    assert (run_dir / "negatives.jsonl").is_file() and (run_dir / "reward.png").is_file()
    from elva.model import ElvaEmbedder

    model = ElvaEmbedder.from_pretrained(out)
    assert model.config.extraction == "generative"


def test_sigkill_then_resume_matches_uninterrupted_run(stage2, tmp_path):
    steps = ["train.max_steps=8", "train.batch_size=4", "train.save_every=1", "train.keep_last=20",
             "train.merge_lora_at_end=false"]
    whole = tmp_path / "whole"
    run_grpo(_config(stage2, whole, *steps))

    killed = tmp_path / "killed"
    cfg_file = tmp_path / "killed.yaml"
    # The same negatives file, so the resumed run does not depend on when it was killed.
    save_config(_config(stage2, killed, *steps, f"data.negatives={whole / 'negatives.jsonl'}"), cfg_file)
    stopped_at = train_until_killed("elva.train.grpo", cfg_file, killed, REPO, timeout=120)
    assert stopped_at < 8, "the run finished before it was killed; nothing was resumed"

    run_stage(load_config(cfg_file, ["train.resume=true"]))
    a = checkpoint.load(checkpoint.latest(whole))["adapter"]
    b = checkpoint.load(checkpoint.latest(killed))["adapter"]
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from step {stopped_at}"
    assert [r["reward"] for r in _rows(killed)] == [r["reward"] for r in _rows(whole)]


def test_two_ranks_under_torchrun(stage2, tmp_path):
    port = free_port()
    run_dir = tmp_path / "pair"
    cfg_file = tmp_path / "pair.yaml"
    save_config(_config(stage2, run_dir, "train.max_steps=2", "train.batch_size=4", "rl.group_size=4"), cfg_file)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "elva.train.grpo", str(cfg_file)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_rows(run_dir)) == 2
    assert (run_dir / "model" / "elva_model.json").is_file()


def test_bad_negatives_and_config_are_reported(stage2, tmp_path):
    bad = tmp_path / "negatives.jsonl"
    bad.write_text('{"qid": "x", "hard": [], "random": []}\nnot json\n')
    with pytest.raises(ValueError, match=r"negatives.jsonl:2"):
        run_grpo(_config(stage2, tmp_path / "run", f"data.negatives={bad}"))
    with pytest.raises(ValueError, match="does not exist"):
        run_grpo(_config(stage2, tmp_path / "run2", f"data.negatives={tmp_path / 'missing.jsonl'}"))
    with pytest.raises(ValueError, match="rl.rollout_candidates"):
        _config(stage2, tmp_path / "run3", "rl.rollout_candidates=some")
    with pytest.raises(ValueError, match="run_grpo"):
        run_training(_config(stage2, tmp_path / "run4"))
    with pytest.raises(ValueError, match="unknown config key rl.bogus"):
        _config(stage2, tmp_path / "run5", "rl.bogus=1")
