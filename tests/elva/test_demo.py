"""`elva demo` end to end on a small synthetic set: stages 1-2 beat the untrained model on multi-grain R@5."""
from elva import demo


def test_stage_two_beats_the_untrained_model(tmp_path):
    result = demo.run(tmp_path / "run", scenes=120)
    assert result["r5_after"] > result["r5_before"] + 0.05, (result["r5_before"], result["r5_after"])
    assert (tmp_path / "run" / "eval" / "recall.tsv").is_file()
    assert any(path.suffix == ".png" for path in (tmp_path / "run" / "eval").iterdir())
