"""M-BEIR readers on a hand-written fixture in the released format, and the file:line errors on broken variants."""
import json

import pytest
from PIL import Image

from elva.data.mbeir import load_captions, load_instructions, load_pool, load_queries, resolve_image

QUERIES = [
    {"qid": "9:1", "query_txt": "A dog runs on the beach.", "query_img_path": None, "query_modality": "text",
     "query_src_content": "{\"id\": 1}", "pos_cand_list": ["9:10"], "neg_cand_list": ["9:11"], "task_id": 0},
    {"qid": "9:2", "query_txt": None, "query_img_path": "mbeir_images/mscoco_images/cat.png", "query_modality": "image",
     "query_src_content": None, "pos_cand_list": ["9:12"], "neg_cand_list": [], "task_id": 3, "grains": [{"type": "entity", "value": "cat", "span": None}]},
    {"qid": "8:3", "query_txt": "make it red", "query_img_path": "mbeir_images/mscoco_images/dog.png", "query_modality": "image,text",
     "query_src_content": None, "pos_cand_list": ["9:11", "9:10"], "neg_cand_list": [], "task_id": 7},
]
POOL = [
    {"did": "9:10", "txt": None, "img_path": "mbeir_images/mscoco_images/dog.png", "modality": "image", "src_content": None},
    {"did": "9:11", "txt": None, "img_path": "mbeir_images/mscoco_images/cat.png", "modality": "image", "src_content": None},
    {"did": "9:12", "txt": "A cat sleeps.", "img_path": None, "modality": "text", "src_content": "{}"},
]
INSTRUCTIONS = (
    "query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2\n"
    "text\timage\tMSCOCO\t9\tRetrieve an image that matches the caption.\tFind the picture.\n"
    "image\ttext\tMSCOCO\t9\tFind a caption for the image.\t\n"
    "image,text\timage\tCIRR\t8\tApply the change and retrieve the image.\n"
)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def mbeir(tmp_path):
    image_dir = tmp_path / "mbeir_images/mscoco_images"
    image_dir.mkdir(parents=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(image_dir / "dog.png")
    Image.new("RGB", (4, 4), (10, 10, 200)).save(image_dir / "cat.png")
    (tmp_path / "query_instructions.tsv").write_text(INSTRUCTIONS)
    return {
        "root": tmp_path,
        "queries": write_jsonl(tmp_path / "queries.jsonl", QUERIES),
        "pool": write_jsonl(tmp_path / "pool.jsonl", POOL),
        "instructions": tmp_path / "query_instructions.tsv",
    }


def test_fixture_loads(mbeir):
    pool = load_pool(mbeir["pool"], image_root=mbeir["root"])
    queries = load_queries(mbeir["queries"], pool=pool, image_root=mbeir["root"])
    assert list(pool) == ["9:10", "9:11", "9:12"]
    assert pool["9:12"].txt == "A cat sleeps." and pool["9:12"].modality == "text" and pool["9:12"].img_path is None
    assert [query.qid for query in queries] == ["9:1", "9:2", "8:3"]
    first, second, third = queries
    assert first.query_txt == "A dog runs on the beach." and first.query_img_path is None and first.task_id == 0
    assert first.pos_cand_list == ("9:10",) and first.neg_cand_list == ("9:11",) and first.query_src_content == "{\"id\": 1}"
    assert first.dataset_id == "9" and first.origin == f"{mbeir['queries']}:1"
    assert second.extra == {"grains": [{"type": "entity", "value": "cat", "span": None}]}
    assert third.query_modality == "image,text" and third.pos_cand_list == ("9:11", "9:10")
    assert resolve_image(mbeir["root"], second.query_img_path) == mbeir["root"] / "mbeir_images/mscoco_images/cat.png"


def test_instructions_keyed_by_dataset_and_modalities(mbeir):
    table = load_instructions(mbeir["instructions"])
    assert table.lookup("9", "text", "image") == ("Retrieve an image that matches the caption.", "Find the picture.")
    assert table.lookup("9", "image", "text") == ("Find a caption for the image.",)  # the empty trailing column is dropped
    pool = load_pool(mbeir["pool"])
    query = load_queries(mbeir["queries"])[2]
    assert table.for_query(query, pool[query.pos_cand_list[0]]) == ("Apply the change and retrieve the image.",)
    with pytest.raises(KeyError, match="dataset_id=9, query_modality='text', cand_modality='text'"):
        table.lookup("9", "text", "text")


def test_malformed_json_names_file_and_line(mbeir):
    lines = mbeir["queries"].read_text().splitlines()
    lines[1] = lines[1][:-1]  # drop the closing brace
    mbeir["queries"].write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"^{mbeir['queries']}:2: malformed JSON"):
        load_queries(mbeir["queries"])


def test_missing_field_names_file_line_and_field(mbeir):
    broken = [dict(record) for record in QUERIES]
    del broken[2]["task_id"]
    write_jsonl(mbeir["queries"], broken)
    with pytest.raises(ValueError, match=rf"^{mbeir['queries']}:3: missing required field\(s\) task_id$"):
        load_queries(mbeir["queries"])
    broken_pool = [dict(record) for record in POOL]
    del broken_pool[1]["modality"]
    write_jsonl(mbeir["pool"], broken_pool)
    with pytest.raises(ValueError, match=rf"^{mbeir['pool']}:2: missing required field\(s\) modality$"):
        load_pool(mbeir["pool"])


def test_unknown_positive_names_file_line_and_id(mbeir):
    broken = [dict(record) for record in QUERIES]
    broken[1]["pos_cand_list"] = ["9:99"]
    write_jsonl(mbeir["queries"], broken)
    load_queries(mbeir["queries"])  # without a pool there is nothing to check against
    with pytest.raises(ValueError, match=rf"^{mbeir['queries']}:2: pos_cand_list has candidate id\(s\) not in the pool: 9:99$"):
        load_queries(mbeir["queries"], pool=load_pool(mbeir["pool"]))


def test_missing_image_names_the_referencing_line(mbeir):
    (mbeir["root"] / "mbeir_images/mscoco_images/dog.png").unlink()
    # Eager: on load with an image root.
    with pytest.raises(FileNotFoundError, match=rf"^{mbeir['queries']}:3: image 'mbeir_images/mscoco_images/dog.png' not found"):
        load_queries(mbeir["queries"], image_root=mbeir["root"])
    with pytest.raises(FileNotFoundError, match=rf"^{mbeir['pool']}:1: image "):
        load_pool(mbeir["pool"], image_root=mbeir["root"])
    # Lazy: resolve_image with the record's origin.
    query = load_queries(mbeir["queries"])[2]
    with pytest.raises(FileNotFoundError, match=rf"^{mbeir['queries']}:3: image 'mbeir_images/mscoco_images/dog.png'"):
        resolve_image(mbeir["root"], query.query_img_path, referenced_by=query.origin)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"query_modality": "video"}, "query_modality must be one of"),
        ({"query_txt": None}, "query_modality is 'text' but query_txt is None"),
        ({"task_id": "0"}, "task_id must be an M-BEIR task id"),
        ({"pos_cand_list": []}, "pos_cand_list is empty"),
        ({"pos_cand_list": "9:10"}, "pos_cand_list must be a list of did strings"),
    ],
)
def test_bad_values_name_file_and_line(mbeir, change, message):
    write_jsonl(mbeir["queries"], [QUERIES[1], {**QUERIES[0], **change}])
    with pytest.raises(ValueError, match=rf"^{mbeir['queries']}:2: {message}"):
        load_queries(mbeir["queries"])


def test_duplicate_did_and_bad_instruction_rows(mbeir):
    write_jsonl(mbeir["pool"], [POOL[0], POOL[1], POOL[0]])
    with pytest.raises(ValueError, match=rf"^{mbeir['pool']}:3: duplicate did '9:10' \(first at {mbeir['pool']}:1\)"):
        load_pool(mbeir["pool"])
    mbeir["instructions"].write_text(INSTRUCTIONS + "text\ttext\tWebQA\n")
    with pytest.raises(ValueError, match=rf"^{mbeir['instructions']}:5: expected query_modality"):
        load_instructions(mbeir["instructions"])
    mbeir["instructions"].write_text(INSTRUCTIONS + "text\timage\tMSCOCO\t9\tAgain.\n")
    with pytest.raises(ValueError, match=rf"^{mbeir['instructions']}:5: duplicate instruction key .* \(first at line 2\)"):
        load_instructions(mbeir["instructions"])


CAPTIONS = [{"img_path": "mbeir_images/mscoco_images/dog.png", "txt": "a red dog"},
            {"img_path": "mbeir_images/mscoco_images/cat.png", "txt": "a blue cat"}]


def test_captions_and_the_cold_start_summaries(mbeir):
    """Each input's teacher-forced summary: a text is itself, an image its caption, an (image, text) query its
    positive's; an image without a caption is reported with the line that references it."""
    from elva.train.contrastive import MBeirPairDataset

    captions = write_jsonl(mbeir["root"] / "captions.jsonl", CAPTIONS)
    assert load_captions(captions) == {"mbeir_images/mscoco_images/dog.png": "a red dog",
                                       "mbeir_images/mscoco_images/cat.png": "a blue cat"}
    dataset = MBeirPairDataset([str(mbeir["queries"])], str(mbeir["pool"]), str(mbeir["instructions"]),
                               str(mbeir["root"]), captions=str(captions))
    by_qid = {dataset.queries[i].qid: dataset[(i, 0)] for i in range(len(dataset))}
    assert (by_qid["9:1"].query_summary, by_qid["9:1"].candidate_summary) == ("A dog runs on the beach.", "a red dog")
    assert (by_qid["9:2"].query_summary, by_qid["9:2"].candidate_summary) == ("a blue cat", "A cat sleeps.")
    composed = by_qid["8:3"]
    assert composed.query_summary == composed.candidate_summary in ("a red dog", "a blue cat")
    from elva.data.mbeir import MBeirCandidate

    both = MBeirCandidate(did="9:13", txt="A dog on the grass.", img_path="mbeir_images/mscoco_images/dog.png",
                          modality="image,text", src_content=None)
    assert dataset.summary(both) == "A dog on the grass."  # an (image, text) candidate is summarised by its text
    assert MBeirPairDataset([str(mbeir["queries"])], str(mbeir["pool"]), str(mbeir["instructions"]),
                            str(mbeir["root"]))[(0, 0)].query_summary is None

    write_jsonl(captions, CAPTIONS[:1])
    partial = MBeirPairDataset([str(mbeir["queries"])], str(mbeir["pool"]), str(mbeir["instructions"]),
                               str(mbeir["root"]), captions=str(captions))
    with pytest.raises(ValueError, match=rf"^{mbeir['queries']}:2: image 'mbeir_images/mscoco_images/cat.png' has "
                                         r"no caption in data.captions"):
        partial[(1, 0)]


@pytest.mark.parametrize("records, message", [
    ([CAPTIONS[0], {"img_path": "x.png"}], "2: missing required field\\(s\\) txt"),
    ([{"img_path": "x.png", "txt": "  "}], "1: img_path and txt must be strings and txt non-empty"),
    ([{"img_path": None, "txt": "a"}], "1: img_path and txt must be strings"),
    ([CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]], "3: duplicate img_path .* \\(first at line 1\\)"),
])
def test_bad_captions_name_file_and_line(tmp_path, records, message):
    path = write_jsonl(tmp_path / "captions.jsonl", records)
    with pytest.raises(ValueError, match=rf"^{path}:{message}"):
        load_captions(path)
