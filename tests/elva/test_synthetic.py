"""The synthetic multi-grain benchmark: determinism, M-BEIR loadability, one-grain-apart negatives, drop_grain."""
import json

import pytest

from elva.data.mbeir import TASKS, load_captions, load_instructions, load_pool, load_queries
from elva.data.nli import load_nli_pairs
from elva.data.synthetic import GRAIN_TYPES, TASK_KINDS, drop_grain, grains_of, make_multigrain

SCENES = 40


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    manifest = make_multigrain(tmp_path_factory.mktemp("multigrain") / "data", seed=3, scenes=SCENES)
    pools = {split: {task: load_pool(path, image_root=manifest.root) for task, path in tasks.items()} for split, tasks in manifest.local_pools.items()}
    queries = {
        split: {task: load_queries(path, pool=pools[split][task], image_root=manifest.root) for task, path in tasks.items()}
        for split, tasks in manifest.queries.items()
    }
    return manifest, pools, queries


def scene_of(candidate):
    return {grain["type"]: grain["value"] for grain in candidate.extra["grains"]}


def files_of(root):
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path, generated):
    manifest, _, _ = generated
    again = make_multigrain(tmp_path / "again", seed=3, scenes=SCENES)
    first, second = files_of(manifest.root), files_of(again.root)
    assert list(first) == list(second)
    assert [name for name in first if first[name] != second[name]] == []
    other = files_of(make_multigrain(tmp_path / "other", seed=4, scenes=SCENES).root)
    assert other["query/test/mbeir_multigrain_task0_test.jsonl"] != first["query/test/mbeir_multigrain_task0_test.jsonl"]


def test_every_task_kind_present_with_its_modalities(generated):
    _, pools, queries = generated
    test_scenes = round(SCENES * 0.25)
    for split, scene_count in (("train", SCENES - test_scenes), ("test", test_scenes)):
        assert sorted(queries[split]) == [0, 3, 4, 7]
        for task, task_queries in queries[split].items():
            query_modality, cand_modality = TASKS[task]
            assert len(task_queries) == scene_count
            assert {query.task_id for query in task_queries} == {task}
            assert {query.query_modality for query in task_queries} == {query_modality}
            assert {candidate.modality for candidate in pools[split][task].values()} == {cand_modality}


def test_instructions_cover_every_task(generated):
    manifest, pools, queries = generated
    table = load_instructions(manifest.instructions)
    for task, task_queries in queries["test"].items():
        query = task_queries[0]
        assert table.for_query(query, pools["test"][task][query.pos_cand_list[0]]) == TASK_KINDS[task][2]


def test_hard_negatives_differ_in_exactly_the_recorded_grain(generated):
    _, pools, queries = generated
    for split in queries:
        for task, task_queries in queries[split].items():
            pool = pools[split][task]
            for query in task_queries:
                recorded = query.extra["hard_negatives"]
                assert [entry["did"] for entry in recorded] == list(query.neg_cand_list)
                assert len(recorded) == 3
                positive = scene_of(pool[query.pos_cand_list[0]])
                for entry in recorded:
                    negative = scene_of(pool[entry["did"]])
                    assert [grain for grain in GRAIN_TYPES if negative[grain] != positive[grain]] == [entry["grain"]], query.origin


def test_query_grains_match_the_positive(generated):
    _, pools, queries = generated
    for task, task_queries in queries["train"].items():
        for query in task_queries:
            positive = scene_of(pools["train"][task][query.pos_cand_list[0]])
            grains = grains_of(query)
            assert all(positive[grain.type] == grain.value for grain in grains)
            if task == 7:  # the modification names two grains, each in its clause
                assert len(grains) == 2 and all(grain.span is not None for grain in grains)
            else:
                assert sorted(grain.type for grain in grains) == sorted(GRAIN_TYPES)
                assert all((grain.span is not None) == (task == 0) for grain in grains)


def test_drop_grain_removes_exactly_that_grains_words(generated):
    _, _, queries = generated
    for task in (0, 7):
        for query in queries["test"][task]:
            for grain in grains_of(query):
                start, end = grain.span
                expected = (query.query_txt[:start] + query.query_txt[end:]).split()
                if task == 7:  # the clause goes with the "and" that joined it
                    expected.remove("and")
                assert drop_grain(query, grain.type) == " ".join(expected)
                assert query.query_txt[start:end] not in drop_grain(query, grain.type)
    query = queries["test"][0][0]
    assert drop_grain(query, "colour").split() == [word for word in query.query_txt.split() if word != dict((g.type, g.value) for g in grains_of(query))["colour"]]
    with pytest.raises(ValueError, match="no 'colour' grain in the query text"):
        drop_grain(queries["test"][3][0], "colour")  # an image query has no text to drop from


def test_splits_are_disjoint(generated):
    _, pools, queries = generated
    qids = {split: {query.qid for task_queries in queries[split].values() for query in task_queries} for split in queries}
    assert not qids["train"] & qids["test"]

    def query_scenes(split):
        return {tuple(sorted(scene_of(pools[split][0][query.pos_cand_list[0]]).items())) for query in queries[split][0]}

    train_scenes, test_scenes = query_scenes("train"), query_scenes("test")
    assert not train_scenes & test_scenes
    for split, other_scenes in (("train", test_scenes), ("test", train_scenes)):
        for pool in pools[split].values():
            assert not {tuple(sorted(scene_of(candidate).items())) for candidate in pool.values()} & other_scenes


def test_global_pool_is_the_union_of_local_pools(generated):
    manifest, pools, _ = generated
    for split, path in manifest.global_pools.items():
        global_pool = load_pool(path, image_root=manifest.root)
        assert set(global_pool) == set().union(*(set(pool) for pool in pools[split].values()))
        for pool in pools[split].values():
            for did, candidate in pool.items():
                assert (candidate.txt, candidate.img_path, candidate.modality) == (global_pool[did].txt, global_pool[did].img_path, global_pool[did].modality)


def test_stage1_pairs_and_manifest(generated):
    manifest, _, _ = generated
    pairs = load_nli_pairs(manifest.nli_pairs)
    assert len(pairs) == SCENES - round(SCENES * 0.25)
    assert all(pair.anchor != pair.positive and pair.hard_negative not in (None, pair.anchor) for pair in pairs)
    summary = json.loads((manifest.root / "manifest.json").read_text())
    assert summary["parameters"]["seed"] == 3 and (manifest.root / summary["global_pools"]["test"]).is_file()


def test_captions_cover_the_train_images_only(generated):
    """The cold start's captions: every image of the train split (queries and candidates) has its scene's caption;
    test-only images have none."""
    manifest, pools, queries = generated
    captions = load_captions(manifest.captions)
    for query in queries["train"][0]:  # text -> image: the query text is the positive image's caption
        assert captions[pools["train"][0][query.pos_cand_list[0]].img_path] == query.query_txt
    train_images = ({c.img_path for pool in pools["train"].values() for c in pool.values() if c.img_path}
                    | {q.query_img_path for task_queries in queries["train"].values() for q in task_queries
                       if q.query_img_path})
    test_images = ({c.img_path for pool in pools["test"].values() for c in pool.values() if c.img_path}
                   | {q.query_img_path for task_queries in queries["test"].values() for q in task_queries
                      if q.query_img_path})
    assert set(captions) == train_images and not set(captions) & (test_images - train_images)
    summary = json.loads((manifest.root / "manifest.json").read_text())
    assert manifest.root / summary["captions"] == manifest.captions


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="scenes must be in"):
        make_multigrain(tmp_path / "a", scenes=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="is not empty"):
        make_multigrain(tmp_path / "full", scenes=4)
