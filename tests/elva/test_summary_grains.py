"""benchmarks/summary_grains.py: grain phrases from a candidate's scene, whole-word matching, and a run on the
tiny model."""
import importlib.util
from pathlib import Path

import pytest

from elva.data.mbeir import MBeirCandidate

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "summary_grains.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("summary_grains", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grain_phrases_and_whole_word_matching(script):
    grains = [{"type": "shape", "value": "circle"}, {"type": "colour", "value": "red"},
              {"type": "size", "value": "large"}, {"type": "position", "value": "left"},
              {"type": "count", "value": 2}, {"type": "background", "value": "grey"}]
    candidate = MBeirCandidate(did="10:1", txt=None, img_path="x.png", modality="image", extra={"grains": grains})
    phrases = script.grain_phrases(candidate)
    assert phrases == {"count": ["two"], "size": ["large"], "colour": ["red"], "shape": ["circles"],
                       "position": ["at", "the", "left"], "background": ["on", "a", "grey", "background"]}
    words = "two small red circles at the left on a white background".split()
    assert [script.contains(words, phrase) for phrase in phrases.values()] == [True, False, True, True, True, False]
    assert not script.contains("circle".split(), ["circles"])


def test_runs_on_the_tiny_model(script, tmp_path):
    from elva.data.synthetic import make_multigrain
    from elva.model import ElvaEmbedder

    make_multigrain(tmp_path / "data", seed=0, scenes=12)
    model = ElvaEmbedder.tiny(seed=0, lora_r=0, generative_max_new_tokens=3)
    rows = script.summary_grains(model, tmp_path / "data")
    assert [row["task"] for row in rows] == [0, 3, 4, 7, "mean"]
    assert all(0 <= row["grains_right"] <= 1 and 0 <= row["all_six_right"] <= row["grains_right"] for row in rows)
    assert rows[-1]["n_queries"] == sum(row["n_queries"] for row in rows[:-1])
