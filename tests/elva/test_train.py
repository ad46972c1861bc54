"""Stages 1-2 trainer: a short run learns and writes its files, SIGKILL + resume is exact, 2 ranks equal 1, config."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elva.config import load_config
from tests.helpers import free_port, train_until_killed
from elva.train import checkpoint, run_training

REPO = Path(__file__).resolve().parents[2]
STAGE2 = REPO / "configs" / "tiny_stage2.yaml"
COLDSTART = REPO / "configs" / "tiny_coldstart.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from elva.data.synthetic import make_multigrain

    root = tmp_path_factory.mktemp("multigrain") / "data"
    make_multigrain(root, seed=0, scenes=40)
    return root


def _config(data_dir: Path, run_dir: Path, *overrides: str):
    return load_config(STAGE2, [f"run_dir={run_dir}", *overrides], {"data_dir": str(data_dir)})


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "logs.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def _final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.latest(run_dir))["adapter"]


def test_short_stage2_run_learns_and_writes_everything(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    out = run_training(_config(data_dir, run_dir, "train.max_steps=24", "train.lr=1e-2", "train.log_every=4",
                               "train.save_every=8", "train.keep_last=2"))
    assert out == run_dir / "model"
    losses = list(_losses(run_dir).values())
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.2, losses
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step_00000016", "step_00000024"]
    assert (run_dir / "config.yaml").is_file()
    assert load_config(run_dir / "config.yaml").train.max_steps == 24
    # Every trainable parameter changed (the LoRA B matrices start at zero).
    adapter = _final_adapter(run_dir)
    assert adapter and all(bool(t.abs().sum() > 0) for k, t in adapter.items() if "lora_B" in k)
    # The merged model loads and embeds.
    from elva.model import ElvaEmbedder

    model = ElvaEmbedder.from_pretrained(out, lora_r=0)
    assert not model.has_lora
    assert model.embed(["a small red circle"]).shape == (1, model.hidden_size)
    # A second fresh run into the same folder is refused rather than mixed with the old checkpoints.
    with pytest.raises(ValueError, match="train.resume=true"):
        run_training(_config(data_dir, run_dir, "train.max_steps=2"))


def test_generative_cold_start_learns_to_summarise(data_dir, tmp_path):
    """Stage 2 with model.extraction generative: InfoNCE at [RET] plus the summaries' next-token loss. The tiny
    model, whose language-model head starts random, learns to write the captions it is taught and saves a model that
    evaluates through [RET]."""
    from elva.data.mbeir import load_queries
    from elva.model import ElvaEmbedder

    run_dir = tmp_path / "cold"
    out = run_training(load_config(COLDSTART, [f"run_dir={run_dir}", "train.max_steps=60", "train.log_every=10",
                                               "train.save_every=60"], {"data_dir": str(data_dir)}))
    losses = list(_losses(run_dir).values())
    assert losses[-1] < losses[0] / 3, losses
    model = ElvaEmbedder.from_pretrained(out, lora_r=0)
    assert (model.config.extraction, model.config.generative_max_new_tokens) == ("generative", 20)
    texts = [q.query_txt for q in load_queries(data_dir / "query/train/mbeir_multigrain_task0_train.jsonl")][:8]
    generation = model.generate_embed(texts, max_new_tokens=20)
    written = [model.tokenizer.decode(ids[:end]) for ids, end in zip(generation.completion_ids, generation.ret_index)]
    overlap = [len(set(w.split()) & set(t.split())) / len(set(t.split())) for w, t in zip(written, texts)]
    assert sum(overlap) / len(overlap) > 0.3, list(zip(texts, written))  # the random head writes none
    assert bool(generation.ret_generated.all())  # it learned to close the summary with [RET]


def test_sigkill_then_resume_matches_uninterrupted_run(data_dir, tmp_path):
    steps = ["train.max_steps=40", "train.lr=1e-2", "train.batch_size=8", "train.save_every=2", "train.log_every=1",
             "train.keep_last=50", "train.merge_lora_at_end=false"]
    whole = tmp_path / "whole"
    run_training(_config(data_dir, whole, *steps))

    killed = tmp_path / "killed"
    cfg_file = tmp_path / "killed.yaml"
    from elva.config import save_config

    save_config(_config(data_dir, killed, *steps), cfg_file)
    stopped_at = train_until_killed("elva.train.contrastive", cfg_file, killed, REPO, timeout=60)
    assert stopped_at < 40, "the run finished before it was killed; nothing was resumed"

    run_training(load_config(cfg_file, ["train.resume=true"]))
    a, b = _final_adapter(whole), _final_adapter(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from step {stopped_at}"
    # The log holds each step once, with the uninterrupted run's losses.
    assert _losses(killed) == _losses(whole)


def test_two_ranks_equal_one_process_on_the_same_global_batch(data_dir, tmp_path):
    common = ["train.max_steps=2", "train.batch_size=8", "train.log_every=1", "train.save_every=100",
              "train.lr=1e-3", "train.merge_lora_at_end=false"]
    single = tmp_path / "single"
    run_training(_config(data_dir, single, *common))

    pair = tmp_path / "pair"
    cfg_file = tmp_path / "pair.yaml"
    from elva.config import save_config

    save_config(_config(data_dir, pair, *common), cfg_file)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "elva.train.contrastive", str(cfg_file)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _losses(single), _losses(pair)
    # Step 1: the same weights and the same global batch of 8, split 4 + 4 with candidates gathered across ranks.
    assert abs(one[1] - two[1]) <= 1e-6, (one, two)
    # Step 2 follows gradients averaged over ranks: equal up to the all-reduce's rounding.
    assert abs(one[2] - two[2]) <= 1e-4, (one, two)
    a, b = _final_adapter(single), _final_adapter(pair)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_config_overrides_types_and_unknown_keys(tmp_path):
    cfg = load_config(STAGE2, ["train.lr=4e-5", "train.max_steps=null", "train.epochs=2", "train.bf16=false",
                               "model.lora_r=64", "model.lora_alpha=128", "data.queries=[a.jsonl, b.jsonl]"],
                      {"data_dir": "/data"})
    assert cfg.train.lr == pytest.approx(4e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps is None and cfg.train.epochs == 2.0 and cfg.train.bf16 is False
    assert cfg.model.lora_r == 64 and cfg.model.lora_alpha == 128.0
    assert cfg.data.queries == ["a.jsonl", "b.jsonl"]
    assert cfg.data.pool == "/data/cand_pool/global/mbeir_multigrain_train_cand_pool.jsonl"
    for bad, key in (("train.lrr=1", "train.lrr"), ("model.rank=4", "model.rank"), ("dataa.kind=nli", "dataa")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            load_config(STAGE2, [bad])
    with pytest.raises(ValueError, match="train.batch_size"):
        load_config(STAGE2, ["train.batch_size=abc"])
    with pytest.raises(ValueError, match="multiple of train.grad_accum"):
        load_config(STAGE2, ["train.batch_size=10", "train.grad_accum=4"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(STAGE2, ["train.lr"])
    # Placeholders left unresolved are reported when the run starts, before anything is written.
    with pytest.raises(ValueError, match="data_dir"):
        run_training(load_config(STAGE2, [f"run_dir={tmp_path / 'r'}"]))
    assert not (tmp_path / "r").exists()
    # The generative cold start is stage 2 on M-BEIR pairs, with captions for the image summaries.
    with pytest.raises(ValueError, match="needs data.captions"):
        load_config(COLDSTART, ["data.captions=null"], {"data_dir": "/d"})
    with pytest.raises(ValueError, match="model.extraction 'generative' trains the generative cold start"):
        load_config(REPO / "configs" / "tiny_stage1.yaml", ["model.extraction=generative"], {"data_dir": "/d"})
    with pytest.raises(ValueError, match="train.summary_weight"):
        load_config(COLDSTART, ["train.summary_weight=-1"], {"data_dir": "/d"})
    # The paper recipes load and carry SPEC's stage-2 settings.
    for name in ("qwen2vl_2b", "qwen2vl_7b"):
        paper = load_config(REPO / "configs" / f"{name}.yaml", variables={"data_dir": "/d", "model_path": "/m"})
        assert (paper.train.batch_size, paper.train.lr, paper.train.epochs) == (960, 1e-4, 1.0)
        assert (paper.model.lora_r, paper.model.lora_alpha, paper.train.temperature) == (128, 256.0, 0.05)
