"""``elva demo``: the pipeline end to end on the built-in tiny Qwen2-VL and the synthetic multi-grain benchmark.

Makes the data, evaluates the untrained model, runs stage 1 (text pairs), stage 2 (multimodal instruction pairs,
from stage 1's merged model), the generative cold start (stage 2 again, teaching the tiny model to summarise and
embed at ``[RET]``; see configs/tiny_coldstart.yaml) and stage 3 (GRPO with ELVA's ranking rewards, from the cold
start), then prints them side by side: multi-grain R@5 per task and the grain sensitivity. Stage 2 is read at
``<emb>``, the cold start and stage 3 through a greedy summary and ``[RET]``, so "stage3 - coldstart" is the effect
of RL alone. ``elva compare`` repeats this over seeds. Everything lands in the run folder, plots included.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Sequence

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The columns of the stage-2 vs stage-3 table: (label, model, extraction); "coldstart" is stage 3's starting point.
VARIANTS = (("stage2", "stage2", "emb"), ("coldstart", "coldstart", "generative"), ("stage3", "stage3", "generative"))
# The headline of a finished run (R@5 before and after, the stage-2 vs stage-3 table), in the run folder.
SUMMARY = "summary.json"


def _stage(config_name: str, run_dir: Path, data_root: Path, seed: int, *extra: str) -> Path:
    from elva.config import load_config
    from elva.train import run_stage

    path = CONFIGS / config_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the demo reads the repository's configs/ folder")
    overrides = [f"run_dir={run_dir}", f"train.seed={seed}", *extra]
    return run_stage(load_config(path, overrides, {"data_dir": str(data_root)}))


def _mean_r5(result: dict) -> float:
    return next(row["R@5"] for row in result["multigrain"] if row["task"] == "mean")


def _overall_distance(result: dict) -> float:
    return next((row["mean_distance"] for row in result["grains"] if row["grain"] == "overall"), float("nan"))


def comparison_rows(results: dict[str, dict]) -> list[dict]:
    """Multi-grain R@5 per task (and their mean), then the overall grain sensitivity, one column per variant."""
    first = results[VARIANTS[0][0]]
    rows = []
    for i, row in enumerate(first["multigrain"]):
        rows.append({"metric": f"R@5 {row['task_name']}" if row["task"] != "mean" else "R@5 mean",
                     **{label: results[label]["multigrain"][i]["R@5"] for label, _, _ in VARIANTS}})
    rows.append({"metric": "grain sensitivity", **{label: _overall_distance(results[label]) for label, _, _ in VARIANTS}})
    return rows


def run(run_dir: Path, *, seed: int = 0, scenes: int = 200) -> dict:
    from elva.config import load_config
    from elva.data.synthetic import make_multigrain
    from elva.eval import evaluate, format_table
    from elva.model import ElvaEmbedder

    run_dir = Path(run_dir)
    data_root = run_dir / "data"
    if not (data_root / "manifest.json").is_file():
        make_multigrain(data_root, seed=seed, scenes=scenes)
    print(f"data: {data_root} ({scenes} scenes)")

    untrained = evaluate(ElvaEmbedder.tiny(seed=seed), data_root, run_dir / "eval_untrained", progress=False,
                         plots=False)
    stage1 = _stage("tiny_stage1.yaml", run_dir / "stage1", data_root, seed)
    stage2 = _stage("tiny_stage2.yaml", run_dir / "stage2", data_root, seed, f"train.init_from={stage1}")
    coldstart = _stage("tiny_coldstart.yaml", run_dir / "coldstart", data_root, seed, f"train.init_from={stage2}")
    stage3 = _stage("tiny_stage3.yaml", run_dir / "stage3", data_root, seed, f"train.init_from={coldstart}")
    models = {"stage2": stage2, "coldstart": coldstart, "stage3": stage3}
    # The cold start is read with stage 3's summary cap, so only the RL differs between those two columns.
    summary_cap = load_config(Path(stage3).parent / "config.yaml").rl.eval_max_new_tokens
    results = {label: evaluate(ElvaEmbedder.from_pretrained(models[model], generative_max_new_tokens=summary_cap),
                               data_root, run_dir / f"eval_{label}", progress=False, extraction=extraction,
                               plots=label != "coldstart")
               for label, model, extraction in VARIANTS}

    trained = results["stage3"]
    print(f"\nrecall after stage 3 (test split)\n{format_table(trained['recall'])}")
    print(f"\ngrain sensitivity after stage 3 (mean cosine distance when one grain is removed)\n"
          f"{format_table(trained['grains'])}")
    table = comparison_rows(results)
    print("\nstage 2 vs stage 3 (stage2: <emb> extraction; coldstart and stage3: summary then [RET])\n"
          f"{format_table(table)}")
    before = _mean_r5(untrained)
    print(f"\nmean multi-grain R@5: untrained {before:.4f} -> stage 2 {_mean_r5(results['stage2']):.4f} -> "
          f"stage 3 {_mean_r5(results['stage3']):.4f}")
    print(f"outputs: {run_dir}")
    headline = {"r5_before": before, "r5_after": _mean_r5(results["stage2"]), "r5_stage3": _mean_r5(results["stage3"]),
                "table": table}
    (run_dir / SUMMARY).write_text(json.dumps(headline, indent=2) + "\n", encoding="utf-8")
    return {"untrained": untrained, **results, **headline, "model": stage3, "models": models}


def compare(run_dir: Path, seeds: Sequence[int], *, scenes: int = 200) -> list[dict]:
    """Run the demo once per seed (data, model init and training all seeded) and report, per metric and variant,
    the mean and the standard deviation over seeds, plus stage 3 minus the cold start (the effect of RL) per seed."""
    from elva.eval import format_table, write_json, write_tsv

    run_dir = Path(run_dir)
    tables = [run(run_dir / f"seed_{seed}", seed=seed, scenes=scenes)["table"] for seed in seeds]
    rows = summarize_seeds(tables, seeds)
    write_tsv(rows, run_dir / "compare.tsv")
    write_json(rows, run_dir / "compare.json")
    print(f"\nstage 2 vs stage 3 over seeds {list(seeds)}: mean (std)\n{format_table(rows)}")
    return rows


def summarize_seeds(tables: Sequence[list[dict]], seeds: Sequence[int]) -> list[dict]:
    rows = []
    for i, first in enumerate(tables[0]):
        row = {"metric": first["metric"]}
        for label, _, _ in VARIANTS:
            values = [table[i][label] for table in tables]
            row[f"{label}_mean"] = statistics.fmean(values)
            row[f"{label}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        gains = [table[i]["stage3"] - table[i]["coldstart"] for table in tables]
        row["stage3_minus_coldstart"] = statistics.fmean(gains)
        row["seeds_improved"] = f"{sum(g > 0 for g in gains)}/{len(seeds)}"
        rows.append(row)
    return rows
