"""`elva demo` end to end: stages 1-2 beat the untrained model on multi-grain R@5, the cold start and stage 3 run,
every evaluation writes its tables, and the stage-2 vs stage-3 table is complete; `elva compare` aggregates seeds.

CI runs the README's demo command just before the tests and points ELVA_DEMO_RUN at its run folder, so this test
checks that run instead of training the same models a second time; without it, the test runs the demo itself.
"""
import json
import os
from pathlib import Path

import pytest

from elva import demo


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    if os.environ.get("ELVA_DEMO_RUN"):
        return Path(os.environ["ELVA_DEMO_RUN"])
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    demo.run(run_dir, scenes=120)
    return run_dir


def test_demo_runs_stages_one_to_three(finished_run):
    summary = json.loads((finished_run / demo.SUMMARY).read_text())
    assert summary["r5_after"] > summary["r5_before"] + 0.05, (summary["r5_before"], summary["r5_after"])
    for label, _, _ in demo.VARIANTS:
        assert (finished_run / f"eval_{label}" / "recall.tsv").is_file()
    assert (finished_run / "eval_untrained" / "recall.tsv").is_file()
    assert any(path.suffix == ".png" for path in (finished_run / "eval_stage3").iterdir())
    table = summary["table"]
    assert [row["metric"] for row in table][-2:] == ["R@5 mean", "grain sensitivity"]
    assert all(0.0 <= row[label] <= 2.0 for row in table for label, _, _ in demo.VARIANTS)
    assert summary["r5_stage3"] == next(row["stage3"] for row in table if row["metric"] == "R@5 mean")


def test_compare_summarizes_seeds():
    tables = [[{"metric": "R@5 mean", "stage2": 0.2, "coldstart": 0.1, "stage3": 0.15}],
              [{"metric": "R@5 mean", "stage2": 0.3, "coldstart": 0.2, "stage3": 0.15}]]
    (row,) = demo.summarize_seeds(tables, [0, 1])
    assert row["stage2_mean"] == pytest.approx(0.25) and row["stage2_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert row["stage3_minus_coldstart"] == pytest.approx(0.0)
    assert row["seeds_improved"] == "1/2"
