"""`elva demo` end to end on a small synthetic set: stages 1-2 beat the untrained model on multi-grain R@5, the cold
start and stage 3 run, and the stage-2 vs stage-3 table is complete; `elva compare` aggregates seeds."""
import pytest

from elva import demo


def test_demo_runs_stages_one_to_three(tmp_path, capsys):
    result = demo.run(tmp_path / "run", scenes=120)
    assert result["r5_after"] > result["r5_before"] + 0.05, (result["r5_before"], result["r5_after"])
    for label, _, _ in demo.VARIANTS:
        assert (tmp_path / "run" / f"eval_{label}" / "recall.tsv").is_file()
    assert any(path.suffix == ".png" for path in (tmp_path / "run" / "eval_stage3").iterdir())
    table = result["table"]
    assert [row["metric"] for row in table][-2:] == ["R@5 mean", "grain sensitivity"]
    assert all(0.0 <= row[label] <= 2.0 for row in table for label, _, _ in demo.VARIANTS)
    assert "stage 2 vs stage 3" in capsys.readouterr().out


def test_compare_summarizes_seeds():
    tables = [[{"metric": "R@5 mean", "stage2": 0.2, "coldstart": 0.1, "stage3": 0.15}],
              [{"metric": "R@5 mean", "stage2": 0.3, "coldstart": 0.2, "stage3": 0.15}]]
    (row,) = demo.summarize_seeds(tables, [0, 1])
    assert row["stage2_mean"] == pytest.approx(0.25) and row["stage2_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert row["stage3_minus_coldstart"] == pytest.approx(0.0)
    assert row["seeds_improved"] == "1/2"
