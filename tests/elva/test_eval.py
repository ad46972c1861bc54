"""elva.eval on a tiny synthetic benchmark: recall tables, grain sensitivity, report files, and an oracle embedder."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from elva.data.mbeir import load_instructions, load_pool, load_queries
from elva.data.synthetic import GRAIN_TYPES, GRAIN_VALUES, TASK_KINDS, grains_of, make_multigrain
from elva.eval import _from_layout, evaluate, find_sources, format_table
from elva.eval.retrieval import candidate_item, positive_rows, query_instruction, query_item, recall_at_k

KS = (1, 5, 10)
TASKS = sorted(TASK_KINDS)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_multigrain(tmp_path_factory.mktemp("multigrain"), seed=0, scenes=40, image_size=56)


@pytest.fixture(scope="module")
def embedder():
    from elva.model import ElvaEmbedder

    return ElvaEmbedder.tiny(seed=0)


@pytest.fixture(scope="module")
def result(bench, embedder, tmp_path_factory):
    return evaluate(embedder, bench.root, tmp_path_factory.mktemp("report"), batch_size=16, ks=KS, progress=False)


# ---- an oracle: one-hot per (scene, modality), so every positive is an exact match --------------------------------
_WORDS = {str(value): (grain, value) for grain, values in GRAIN_VALUES.items() for value in values if grain != "count"}
_WORDS.update({"one": ("count", 1), "two": ("count", 2), "three": ("count", 3)})
_SCENES = [dict(zip(GRAIN_TYPES, values)) for values in __import__("itertools").product(*GRAIN_VALUES.values())]
_SCENE_INDEX = {tuple(scene[g] for g in GRAIN_TYPES): i for i, scene in enumerate(_SCENES)}


class OracleEmbedder:
    """Reads the scene from the pixels (a table of the benchmark's renders) and the grain words of the text, applies
    a modification text on top of the image's scene, and targets the instruction's candidate modality. Without an
    instruction (a candidate), the item's own modality."""

    def __init__(self, root: Path):
        from PIL import Image

        self.scene_of_image = {}
        for path in (root / "images/multigrain").glob("*.png"):
            parts = path.stem.split("_")[:-1]  # drop the "v<variant>" suffix
            scene = dict(zip(GRAIN_TYPES, parts))
            scene["count"] = int(scene["count"])
            with Image.open(path) as image:
                self.scene_of_image[hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()] = scene
        self.target = {prompt: cand for _, cand, prompts in TASK_KINDS.values() for prompt in prompts}
        self.calls = 0

    def embed(self, items, instructions=None, batch_size=32):
        from PIL import Image

        items = list(items)
        if instructions is None or isinstance(instructions, str):
            instructions = [instructions] * len(items)
        out = torch.zeros(len(items), 2 * len(_SCENES))
        for row, (item, instruction) in enumerate(zip(items, instructions)):
            image, text = (item, None) if isinstance(item, Image.Image) else (None, item) if isinstance(item, str) else item
            scene = dict(self.scene_of_image[hashlib.sha1(image.tobytes()).hexdigest()]) if image is not None else {}
            for word in (text or "").split():
                word = word[:-1] if word.endswith("s") and word[:-1] in _WORDS else word
                if word in _WORDS:
                    grain, value = _WORDS[word]
                    scene[grain] = value
            modality = self.target[instruction] if instruction else ("text" if image is None else "image")
            index = _SCENE_INDEX[tuple(scene[g] for g in GRAIN_TYPES)]
            out[row, 2 * index + (modality == "text")] = 1.0
        self.calls += 1
        return out


# ---- recall -----------------------------------------------------------------------------------------------------
def test_recall_table_has_every_task_and_pool_in_mbeir_order(result, bench):
    rows = result["recall"]
    assert [(row["pool"], row["task"]) for row in rows] == [(pool, task) for pool in ("local", "global") for task in TASKS]
    for row in rows:
        assert row["dataset"] == "multigrain" and row["dataset_id"] == "10"
        assert row["n_queries"] == len(load_queries(bench.queries["test"][row["task"]]))
        assert row["n_without_positive"] == 0
        pool_file = bench.local_pools["test"][row["task"]] if row["pool"] == "local" else bench.global_pools["test"]
        assert row["pool_size"] == len(load_pool(pool_file))
        for k in KS:
            assert 0.0 <= row[f"R@{k}"] <= 1.0
        assert row["R@1"] <= row["R@5"] <= row["R@10"]


def _brute_force_recall(query_emb, pool_emb, positives, ks):
    """Cosine scores in torch, the total order (score desc, index asc) by a stable sort; returns hits [B, len(ks)]
    and a mask of the (query, k) cells whose outcome hinges on a near-tie (|gap| < 1e-5) at the cut-off."""
    scores = torch.nn.functional.normalize(query_emb, dim=1) @ torch.nn.functional.normalize(pool_emb, dim=1).T
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    hits = torch.zeros(len(query_emb), len(ks), dtype=torch.bool)
    fragile = torch.zeros_like(hits)
    for b in range(len(query_emb)):
        best = max(scores[b, p].item() for p in positives[b] if p >= 0)
        for j, k in enumerate(ks):
            top = order[b, :k].tolist()
            hits[b, j] = any(p in top for p in positives[b] if p >= 0)
            edge = scores[b, order[b, min(k, scores.shape[1]) - 1]].item()
            fragile[b, j] = abs(edge - best) < 1e-5 and k < scores.shape[1]
    return hits, fragile


@pytest.mark.parametrize("task, pool", [(0, "local"), (4, "global")])
def test_recall_equals_brute_force(result, bench, embedder, task, pool):
    queries = load_queries(bench.queries["test"][task])
    pool_map = load_pool(bench.local_pools["test"][task] if pool == "local" else bench.global_pools["test"])
    instructions = load_instructions(bench.instructions)
    prompts = [query_instruction(q, instructions, pool_map) for q in queries]
    assert prompts == [TASK_KINDS[task][2][0]] * len(queries)  # the first variant, always
    q = embedder.embed([query_item(x, bench.root) for x in queries], instructions=prompts)
    c = embedder.embed([candidate_item(x, bench.root) for x in pool_map.values()])
    positives = positive_rows(queries, list(pool_map))
    hits, fragile = _brute_force_recall(q, c, positives.tolist(), KS)
    row = next(r for r in result["recall"] if r["task"] == task and r["pool"] == pool)
    for j, k in enumerate(KS):
        expected = hits[:, j].double().mean().item()
        slack = fragile[:, j].sum().item() / len(queries)
        assert abs(row[f"R@{k}"] - expected) <= slack + 1e-12, (k, row, expected)


def test_recall_counts_a_query_without_positive_in_the_pool_as_a_miss():
    emb = torch.eye(3)
    positives = torch.tensor([[0], [-1], [2]])
    assert recall_at_k(emb, emb, positives, (1, 3)).tolist() == pytest.approx([2 / 3, 2 / 3])


def test_oracle_embedder_retrieves_every_positive_first(bench, tmp_path):
    oracle = OracleEmbedder(bench.root)
    out = evaluate(oracle, bench, tmp_path, batch_size=7, ks=KS, grains=False, plots=False, progress=False)
    assert len(out["recall"]) == 2 * len(TASKS)
    for row in out["recall"]:
        assert (row["R@1"], row["R@5"], row["R@10"]) == (1.0, 1.0, 1.0), row
    assert [r["R@5"] for r in out["multigrain"]] == [1.0] * (len(TASKS) + 1)
    assert out["grains"] == []


# ---- grain sensitivity ---------------------------------------------------------------------------------------------
def test_grain_sensitivity_covers_every_text_grain_type(result, bench):
    recorded: dict[str, int] = {}
    for task in TASKS:
        for query in load_queries(bench.queries["test"][task]):
            for grain_type in dict.fromkeys(g.type for g in grains_of(query) if g.span is not None):
                recorded[grain_type] = recorded.get(grain_type, 0) + 1
    rows = {row["grain"]: row for row in result["grains"]}
    assert set(rows) == set(recorded) | {"overall"}
    assert set(recorded) == set(GRAIN_TYPES)  # captions carry all six
    for grain_type, count in recorded.items():
        assert rows[grain_type]["n"] == count
    assert rows["overall"]["n"] == sum(recorded.values())
    assert rows["overall"]["tasks"] == "0,7"  # only the text and the modification queries have text grains
    for row in rows.values():
        assert 0.0 <= row["min_distance"] <= row["mean_distance"] <= row["max_distance"] <= 2.0
        assert math.isfinite(row["std_distance"])


def test_multigrain_r5_is_the_local_recall_r5(result):
    local = {r["task"]: r["R@5"] for r in result["recall"] if r["pool"] == "local"}
    rows = result["multigrain"]
    assert [r["task"] for r in rows] == TASKS + ["mean"]
    assert {r["task"]: r["R@5"] for r in rows[:-1]} == local
    assert rows[-1]["R@5"] == pytest.approx(sum(local.values()) / len(local))


# ---- files and tables ---------------------------------------------------------------------------------------------
def test_report_files(result):
    files = {Path(f).name: Path(f) for f in result["files"]}
    expected = {"recall.tsv", "recall.json", "grains.tsv", "grains.json", "multigrain.tsv", "multigrain.json",
                "recall_r5.png", "grains.png"}
    assert set(files) == expected
    for name in ("recall", "grains", "multigrain"):
        assert json.loads(files[f"{name}.json"].read_text()) == result[name]
        lines = files[f"{name}.tsv"].read_text().splitlines()
        assert lines[0].split("\t") == list(result[name][0])
        assert len(lines) == 1 + len(result[name])
    assert files["recall.tsv"].read_text().splitlines()[0].split("\t")[-3:] == ["R@1", "R@5", "R@10"]
    for png in ("recall_r5.png", "grains.png"):
        assert files[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_table(result):
    text = format_table(result["recall"])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["dataset", "dataset_id", "task"]
    assert len(lines) == 2 + len(result["recall"])
    assert format_table([]) == "(no rows)"


def test_sources_from_manifest_file_object_and_plain_layout(bench):
    from_root = find_sources(bench.root)
    assert find_sources(bench.root / "manifest.json") == from_root
    assert find_sources(bench) == from_root
    layout = _from_layout(bench.root, "test")  # the M-BEIR layout, read without the manifest
    assert layout.query_sets == from_root.query_sets
    assert layout.global_pool == from_root.global_pool and layout.instructions == from_root.instructions
    assert [qs.name for qs in from_root.query_sets] == [f"multigrain_task{t}" for t in TASKS]
    with pytest.raises(ValueError, match="no split 'val'"):
        find_sources(bench.root, split="val")
