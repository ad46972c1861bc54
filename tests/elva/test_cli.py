"""The `elva` command's data, evaluation, mining and info subcommands on a tiny synthetic set."""
import json

from elva.cli import main
from elva.data.mbeir import load_pool, load_queries


def test_make_data_eval_and_mine(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["make-data", "--out", str(data), "--scenes", "40"]) == 0
    assert main(["eval", "--data", str(data), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "recall.tsv").is_file() and (tmp_path / "eval" / "grains.json").is_file()
    out = tmp_path / "negatives.jsonl"
    assert main(["mine", "--data", str(data), "--out", str(out), "--n-hard", "5", "--n-random", "3"]) == 0
    pool = load_pool(data / "cand_pool" / "global" / "mbeir_multigrain_train_cand_pool.jsonl")
    queries = {q.qid: q for q in load_queries(data / "query" / "train" / "mbeir_multigrain_task0_train.jsonl")}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["qid"] for r in records} >= set(queries)
    for record in records:
        assert len(record["hard"]) == 5 and len(record["random"]) == 3
        assert not set(record["hard"]) & set(record["random"])
        assert set(record["hard"] + record["random"]) <= set(pool)
        if record["qid"] in queries:
            assert not set(record["hard"] + record["random"]) & set(queries[record["qid"]].pos_cand_list)
    assert "recall" in capsys.readouterr().out


def test_info(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "attention implementation: sdpa" in printed and "similarity_topk" in printed


def test_bench_train_on_the_tiny_model(capsys):
    assert main(["bench", "train", "--size", "tiny", "--batch-size", "4", "--steps", "2", "--image-size", "56"]) == 0
    assert "ms/step" in capsys.readouterr().out


def test_bench_rl_on_the_tiny_model(capsys):
    assert main(["bench", "rl", "--size", "tiny", "--queries", "2", "--group-size", "4", "--candidates", "5",
                 "--max-new-tokens", "3", "--steps", "1", "--image-size", "56"]) == 0
    assert "rollouts/s" in capsys.readouterr().out


def test_train_command_runs_stage_three_and_eval_reads_it_through_ret(tmp_path, capsys):
    data = tmp_path / "data"
    main(["make-data", "--out", str(data), "--scenes", "24"])
    stage3 = ["train", "--config", "configs/tiny_stage3.yaml", "--data-dir", str(data), f"run_dir={tmp_path / 's3'}",
              "train.max_steps=2", "train.batch_size=4", "rl.group_size=2", "rl.n_hard=2", "rl.n_random=2",
              "rl.max_new_tokens=3", "rl.eval_max_new_tokens=3"]
    assert main(stage3) == 0
    model = tmp_path / "s3" / "model"
    assert main(["eval", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "eval")]) == 0
    assert main(["eval", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "eval_emb"),
                 "--extraction", "emb"]) == 0
    from elva.generative import GenerativeEncoder, encoder_for
    from elva.model import ElvaEmbedder

    assert isinstance(encoder_for(ElvaEmbedder.from_pretrained(model)), GenerativeEncoder)  # eval's default here


def test_train_command_writes_the_run_folder_and_resumes(tmp_path):
    data = tmp_path / "data"
    main(["make-data", "--out", str(data), "--scenes", "40"])
    args = ["train", "--config", "configs/tiny_stage1.yaml", "--data-dir", str(data), f"run_dir={tmp_path / 'run'}",
            "train.max_steps=6", "train.save_every=3", "train.log_every=1", "train.batch_size=8"]
    assert main(args) == 0
    for name in ("config.yaml", "logs.csv", "loss.png", "model"):
        assert (tmp_path / "run" / name).exists(), name
    assert main(["train", "--resume", *args[1:], "train.max_steps=8"]) == 0  # continues from the step-6 checkpoint
    steps = [line.split(",")[0] for line in (tmp_path / "run" / "logs.csv").read_text().splitlines()[1:]]
    assert steps == [str(s) for s in range(1, 9)]
