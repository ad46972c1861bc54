"""The synthetic multi-grain benchmark: procedurally drawn scenes, written in the M-BEIR format.

MRBench (the paper's multi-grain benchmark) is not public, so this stands in for it (SPEC Part B, Data). A scene is
one kind of object drawn ``count`` times; its six grains are shape, colour, size, position, count and background.
Every scene gives one query per task kind, with M-BEIR task ids:

- 0 text->image: the caption ("two large red circles at the left on a grey background") retrieves the image;
- 3 image->text: the image retrieves its caption;
- 4 image->image: a jittered re-render of the scene retrieves the canonical render;
- 7 (image, text)->image: the image plus a modification of two grains ("change the colour to green and move
  everything to the top") retrieves the modified scene.

Hard negatives differ from the positive in exactly one grain; ``hard_negatives`` on the query says which. For the
modification task they include the target with one modification left undone. Scenes are split into train and test,
and no candidate of one split shows a scene that is a query scene of the other.

On disk (``out_dir`` is the image root; image paths are relative to it)::

    query/{train,test}/mbeir_multigrain_task{0,3,4,7}_{split}.jsonl
    cand_pool/local/mbeir_multigrain_task{0,3,4,7}_{split}_cand_pool.jsonl
    cand_pool/global/mbeir_multigrain_{split}_cand_pool.jsonl     the union of the split's local pools
    instructions/query_instructions.tsv
    nli/multigrain_train_pairs.tsv                                 stage-1 paraphrase pairs from train scenes
    captions/multigrain_train_captions.jsonl                       {img_path, txt}: the caption of every train image
    images/multigrain/<shape>_<colour>_<size>_<position>_<count>_<background>_v<variant>.png
    manifest.json                                                  the parameters and these paths

Besides the M-BEIR fields, every query carries ``grains``: a list of ``{"type", "value", "span"}``, where ``span``
is ``[start, end)`` in ``query_txt`` or null for grains shown only by the image, and ``hard_negatives``: a list of
``{"did", "grain"}`` in ``neg_cand_list`` order. Candidates carry ``grains`` for all six grains of their scene.
The same seed gives byte-identical files.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from elva.data.mbeir import MBeirQuery
from elva.data.nli import NliPair, write_nli_pairs

DATASET_ID = 10  # after M-BEIR's ten datasets (0-9), so synthetic qids and dids never collide with real ones
DATASET_NAME = "multigrain"

GRAIN_VALUES = {
    "shape": ("circle", "square", "triangle", "diamond"),
    "colour": ("red", "green", "blue", "yellow", "purple", "orange"),
    "size": ("small", "large"),
    "position": ("left", "right", "top", "bottom", "centre"),
    "count": (1, 2, 3),
    "background": ("white", "black", "grey", "beige"),
}
GRAIN_TYPES = tuple(GRAIN_VALUES)

# task id -> (query modality, candidate modality, instruction variants)
TASK_KINDS = {
    0: ("text", "image", ("Find the image that matches this description.", "Retrieve a picture of the scene described.")),
    3: ("image", "text", ("Find the caption that describes this image.", "Retrieve a description of this scene.")),
    4: ("image", "image", ("Find another picture of the same scene.", "Retrieve an image showing exactly this scene.")),
    7: ("image,text", "image", ("Apply the change to this image and find the result.", "Retrieve the image after this modification.")),
}

_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_POSITION_PHRASES = {"left": "at the left", "right": "at the right", "top": "at the top", "bottom": "at the bottom", "centre": "in the centre"}
# The paraphrase template swaps these words, so stage-1 pairs are not string-identical.
_SIZE_SYNONYMS = {"small": "little", "large": "big"}
_POSITION_SYNONYMS = {"left": "on the left side", "right": "on the right side", "top": "near the top", "bottom": "near the bottom", "centre": "in the middle"}

_OBJECT_RGB = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 220, 30), "purple": (140, 40, 170), "orange": (250, 140, 20)}
_BACKGROUND_RGB = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128), "beige": (225, 205, 165)}
# Fractions of the image side: where a group of objects is centred, and an object's diameter.
_POSITION_CENTRES = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "centre": (0.5, 0.5)}
_DIAMETERS = {"small": 0.13, "large": 0.22}
# Offsets of each object from the group centre, in object diameters: apart enough not to merge, close enough to stay
# inside the named region.
_LAYOUTS = {1: ((0.0, 0.0),), 2: ((-0.6, 0.0), (0.6, 0.0)), 3: ((-0.65, 0.45), (0.65, 0.45), (0.0, -0.6))}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    count: int
    background: str

    @property
    def key(self) -> str:
        return "_".join(str(getattr(self, grain)) for grain in GRAIN_TYPES)

    def with_grain(self, grain: str, value) -> Scene:
        return dataclasses.replace(self, **{grain: value})

    def grain_records(self) -> list[dict]:
        return [{"type": grain, "value": getattr(self, grain), "span": None} for grain in GRAIN_TYPES]


@dataclass(frozen=True)
class Grain:
    type: str
    value: str | int
    span: tuple[int, int] | None  # [start, end) in the record's text; None when only the image shows it


@dataclass(frozen=True)
class MultigrainManifest:
    root: Path  # also the image root: image paths in the files are relative to it
    queries: dict[str, dict[int, Path]]  # split -> task id -> query jsonl
    local_pools: dict[str, dict[int, Path]]  # split -> task id -> candidate pool jsonl
    global_pools: dict[str, Path]  # split -> union pool jsonl
    instructions: Path
    nli_pairs: Path
    captions: Path  # the train split's images with their captions: the summaries the generative cold start teaches
    images: Path


def _compose(parts: list[tuple[str | None, object, str]]) -> tuple[str, list[dict]]:
    """Join (grain type or None, grain value, words) parts with spaces, recording each grain's character span."""
    text, grains = "", []
    for grain, value, words in parts:
        if text:
            text += " "
        if grain is not None:
            grains.append({"type": grain, "value": value, "span": [len(text), len(text) + len(words)]})
        text += words
    return text, grains


def _shape_words(scene: Scene) -> str:
    return scene.shape if scene.count == 1 else scene.shape + "s"


def caption(scene: Scene) -> tuple[str, list[dict]]:
    """"two large red circles at the left on a grey background", with a span for each of the six grains."""
    return _compose([
        ("count", scene.count, _COUNT_WORDS[scene.count]),
        ("size", scene.size, scene.size),
        ("colour", scene.colour, scene.colour),
        ("shape", scene.shape, _shape_words(scene)),
        ("position", scene.position, _POSITION_PHRASES[scene.position]),
        ("background", scene.background, f"on a {scene.background} background"),
    ])


def paraphrase(scene: Scene) -> str:
    """The same scene in another template and other words: the positive of a stage-1 pair."""
    size, position = _SIZE_SYNONYMS[scene.size], _POSITION_SYNONYMS[scene.position]
    return f"a {scene.background} background with {_COUNT_WORDS[scene.count]} {size} {scene.colour} {_shape_words(scene)} {position}"


def modification(target: Scene, grains: list[str]) -> tuple[str, list[dict]]:
    """"change the colour to green and move everything to the top": one clause per changed grain."""
    clauses = {
        "shape": lambda: f"change the shape to {target.shape}",
        "colour": lambda: f"change the colour to {target.colour}",
        "size": lambda: f"change the size to {target.size}",
        "position": lambda: f"move everything to the {target.position}",
        "count": lambda: f"change the number to {_COUNT_WORDS[target.count]}",
        "background": lambda: f"change the background to {target.background}",
    }
    parts: list[tuple[str | None, object, str]] = []
    for grain in grains:
        if parts:
            parts.append((None, None, "and"))
        parts.append((grain, getattr(target, grain), clauses[grain]()))
    return _compose(parts)


def render(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene; ``rng`` jitters the group's place and each object's place and size a little."""
    image = Image.new("RGB", (image_size, image_size), _BACKGROUND_RGB[scene.background])
    draw = ImageDraw.Draw(image)
    diameter = _DIAMETERS[scene.size] * image_size
    centre_x, centre_y = (fraction * image_size for fraction in _POSITION_CENTRES[scene.position])
    centre_x += rng.uniform(-0.04, 0.04) * image_size
    centre_y += rng.uniform(-0.04, 0.04) * image_size
    for offset_x, offset_y in _LAYOUTS[scene.count]:
        x = centre_x + offset_x * diameter + rng.uniform(-0.02, 0.02) * image_size
        y = centre_y + offset_y * diameter + rng.uniform(-0.02, 0.02) * image_size
        r = diameter / 2 * rng.uniform(0.9, 1.1)
        fill = _OBJECT_RGB[scene.colour]
        if scene.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif scene.shape == "square":
            side = r * 0.85  # a square of the circle's width looks bigger than the circle
            draw.rectangle((x - side, y - side, x + side, y + side), fill=fill)
        elif scene.shape == "triangle":
            draw.polygon(((x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)), fill=fill)
        else:
            draw.polygon(((x, y - r), (x + r, y), (x, y + r), (x - r, y)), fill=fill)
    return image


class _Writer:
    """Collects candidates (one did per distinct content, shared by every pool that holds it) and writes images."""

    def __init__(self, root: Path, seed: int, image_size: int):
        self.root, self.seed, self.image_size = root, seed, image_size
        self.candidates: dict[tuple, dict] = {}
        self.local_pools: dict[tuple[str, int], set[str]] = {}
        self.images: dict[tuple[Scene, int], str] = {}

    def image(self, scene: Scene, variant: int) -> str:
        if (scene, variant) not in self.images:
            relative = f"images/{DATASET_NAME}/{scene.key}_v{variant}.png"
            # Seeded by the content, not by the order of drawing, so a render never depends on what came before.
            rng = random.Random(f"{self.seed}/{scene.key}/{variant}")
            render(scene, self.image_size, rng).save(self.root / relative, format="PNG")
            self.images[scene, variant] = relative
        return self.images[scene, variant]

    def candidate(self, split: str, task_id: int, modality: str, scene: Scene) -> str:
        key = (modality, scene)
        if key not in self.candidates:
            did = f"{DATASET_ID}:{len(self.candidates) + 1}"
            if modality == "image":
                txt, img_path, grains = None, self.image(scene, 0), scene.grain_records()
            else:
                (txt, grains), img_path = caption(scene), None
            self.candidates[key] = {"did": did, "txt": txt, "img_path": img_path, "modality": modality, "src_content": None, "grains": grains}
        did = self.candidates[key]["did"]
        self.local_pools.setdefault((split, task_id), set()).add(did)
        return did


def _one_apart(scene: Scene, grain: str, rng: random.Random, forbidden: set[Scene]) -> Scene | None:
    values = [value for value in GRAIN_VALUES[grain] if value != getattr(scene, grain)]
    rng.shuffle(values)
    for value in values:
        other = scene.with_grain(grain, value)
        if other not in forbidden:
            return other
    return None


def _hard_negatives(positive: Scene, grains: list[str], wanted: int, rng: random.Random, forbidden: set[Scene]) -> list[tuple[Scene, str]]:
    negatives = []
    for grain in grains:
        if len(negatives) == wanted:
            break
        other = _one_apart(positive, grain, rng, forbidden)
        if other is not None:
            negatives.append((other, grain))
    return negatives


def _queries_for_scene(scene: Scene, split: str, writer: _Writer, rng: random.Random, forbidden: set[Scene], hard_negatives: int) -> list[dict]:
    queries = []

    def add(task_id, txt, img_path, grains, positive, negatives):
        query_modality, cand_modality, _ = TASK_KINDS[task_id]
        positive_did = writer.candidate(split, task_id, cand_modality, positive)
        negative_dids = [writer.candidate(split, task_id, cand_modality, other) for other, _ in negatives]
        queries.append({
            "qid": None,  # numbered once all queries of the split are known
            "query_txt": txt,
            "query_img_path": img_path,
            "query_modality": query_modality,
            "query_src_content": None,
            "pos_cand_list": [positive_did],
            "neg_cand_list": negative_dids,
            "task_id": task_id,
            "grains": grains,
            "hard_negatives": [{"did": did, "grain": grain} for did, (_, grain) in zip(negative_dids, negatives)],
        })

    def shuffled_grains():
        return rng.sample(GRAIN_TYPES, len(GRAIN_TYPES))

    text, grains = caption(scene)
    add(0, text, None, grains, scene, _hard_negatives(scene, shuffled_grains(), hard_negatives, rng, forbidden))
    add(3, None, writer.image(scene, 0), scene.grain_records(), scene, _hard_negatives(scene, shuffled_grains(), hard_negatives, rng, forbidden))
    add(4, None, writer.image(scene, 1), scene.grain_records(), scene, _hard_negatives(scene, shuffled_grains(), hard_negatives, rng, forbidden))

    # The modification changes two grains of the reference scene; its hard negatives first undo one change each.
    target, changed = scene, []
    for grain in shuffled_grains():
        if len(changed) == 2:
            break
        other = _one_apart(target, grain, rng, forbidden)
        if other is not None:
            target, changed = other, changed + [grain]
    undone = [(target.with_grain(grain, getattr(scene, grain)), grain) for grain in changed]
    negatives = [(other, grain) for other, grain in undone if other not in forbidden][:hard_negatives]
    unchanged = [grain for grain in shuffled_grains() if grain not in changed]
    negatives += _hard_negatives(target, unchanged, hard_negatives - len(negatives), rng, forbidden)
    text, grains = modification(target, changed)
    add(7, text, writer.image(scene, 0), grains, target, negatives)
    return queries


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def make_multigrain(
    out_dir: str | Path,
    *,
    seed: int = 0,
    scenes: int = 200,
    image_size: int = 56,
    test_fraction: float = 0.25,
    hard_negatives: int = 3,
) -> MultigrainManifest:
    """Generate the benchmark into ``out_dir`` (new or empty): ``scenes`` scenes, each giving one query per task kind.

    ``image_size`` 56 is four 14-pixel patches a side, so the tiny model sees few visual tokens.
    """
    root = Path(out_dir)
    total_scenes = 1
    for values in GRAIN_VALUES.values():
        total_scenes *= len(values)
    if not 2 <= scenes <= total_scenes:
        raise ValueError(f"scenes must be in [2, {total_scenes}] (the number of distinct grain combinations); got {scenes}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    if not 0 <= hard_negatives <= len(GRAIN_TYPES):
        raise ValueError(f"hard_negatives must be in [0, {len(GRAIN_TYPES)}] (one per grain type); got {hard_negatives}")
    if image_size < 28:
        raise ValueError(f"image_size must be at least 28 pixels (two 14-pixel patches); got {image_size}")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; generate into a new or empty folder so it holds exactly one seed's files")

    rng = random.Random(seed)
    all_scenes = [Scene(*values) for values in itertools.product(*GRAIN_VALUES.values())]
    chosen = rng.sample(all_scenes, scenes)
    test_count = min(scenes - 1, max(1, round(scenes * test_fraction)))
    split_scenes = {"train": chosen[test_count:], "test": chosen[:test_count]}

    for folder in ("query/train", "query/test", "cand_pool/local", "cand_pool/global", "instructions", "nli", "captions",
                   f"images/{DATASET_NAME}"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    writer = _Writer(root, seed, image_size)
    split_queries: dict[str, list[dict]] = {}
    nli_pairs = []
    for split, other_split in (("train", "test"), ("test", "train")):
        forbidden = set(split_scenes[other_split])
        queries = []
        for scene in split_scenes[split]:
            queries += _queries_for_scene(scene, split, writer, rng, forbidden, hard_negatives)
        split_queries[split] = queries
        if split == "train":
            train_images = [(writer.images[key], caption(key[0])[0]) for key in writer.images]
            for scene in split_scenes[split]:
                # A caption one grain away is the hard negative; a scene whose every neighbour is a test scene has none.
                for neighbour, _ in _hard_negatives(scene, rng.sample(GRAIN_TYPES, len(GRAIN_TYPES)), 1, rng, forbidden):
                    nli_pairs.append(NliPair(caption(scene)[0], paraphrase(scene), caption(neighbour)[0]))

    qid_number = itertools.count(1)
    candidates_by_did = {record["did"]: record for record in writer.candidates.values()}
    did_order = {did: index for index, did in enumerate(candidates_by_did)}
    manifest = MultigrainManifest(
        root=root,
        queries={split: {} for split in split_queries},
        local_pools={split: {} for split in split_queries},
        global_pools={},
        instructions=root / "instructions/query_instructions.tsv",
        nli_pairs=root / "nli/multigrain_train_pairs.tsv",
        captions=root / f"captions/{DATASET_NAME}_train_captions.jsonl",
        images=root / f"images/{DATASET_NAME}",
    )
    for split, queries in split_queries.items():
        for query in queries:
            query["qid"] = f"{DATASET_ID}:{next(qid_number)}"
        split_pool: set[str] = set()
        for task_id in TASK_KINDS:
            query_path = root / f"query/{split}/mbeir_{DATASET_NAME}_task{task_id}_{split}.jsonl"
            _write_jsonl(query_path, [query for query in queries if query["task_id"] == task_id])
            manifest.queries[split][task_id] = query_path
            local = sorted(writer.local_pools[split, task_id], key=did_order.__getitem__)
            split_pool.update(local)
            pool_path = root / f"cand_pool/local/mbeir_{DATASET_NAME}_task{task_id}_{split}_cand_pool.jsonl"
            _write_jsonl(pool_path, [candidates_by_did[did] for did in local])
            manifest.local_pools[split][task_id] = pool_path
        global_path = root / f"cand_pool/global/mbeir_{DATASET_NAME}_{split}_cand_pool.jsonl"
        _write_jsonl(global_path, [candidates_by_did[did] for did in sorted(split_pool, key=did_order.__getitem__)])
        manifest.global_pools[split] = global_path

    with open(manifest.instructions, "w", encoding="utf-8") as handle:
        handle.write("query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2\n")
        for query_modality, cand_modality, prompts in TASK_KINDS.values():
            handle.write("\t".join((query_modality, cand_modality, DATASET_NAME, str(DATASET_ID), *prompts)) + "\n")
    write_nli_pairs(manifest.nli_pairs, nli_pairs)
    _write_jsonl(manifest.captions, [{"img_path": path, "txt": text} for path, text in train_images])

    def relative(path: Path) -> str:
        return path.relative_to(root).as_posix()

    summary = {
        "parameters": {"seed": seed, "scenes": scenes, "image_size": image_size, "test_fraction": test_fraction, "hard_negatives": hard_negatives},
        "dataset_id": DATASET_ID,
        "queries": {split: {str(task): relative(path) for task, path in tasks.items()} for split, tasks in manifest.queries.items()},
        "local_pools": {split: {str(task): relative(path) for task, path in tasks.items()} for split, tasks in manifest.local_pools.items()},
        "global_pools": {split: relative(path) for split, path in manifest.global_pools.items()},
        "instructions": relative(manifest.instructions),
        "nli_pairs": relative(manifest.nli_pairs),
        "captions": relative(manifest.captions),
        "images": relative(manifest.images),
    }
    (root / "manifest.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return manifest


def _text_and_grains(record: MBeirQuery | Mapping) -> tuple[str | None, list, str]:
    if isinstance(record, MBeirQuery):
        return record.query_txt, record.extra.get("grains") or [], f"{record.origin}: query {record.qid}"
    return record.get("query_txt"), record.get("grains") or [], f"query {record.get('qid')}"


def grains_of(query: MBeirQuery | Mapping) -> tuple[Grain, ...]:
    """The grains recorded on a query (a loaded ``MBeirQuery`` or a raw jsonl record)."""
    _, grains, _ = _text_and_grains(query)
    return tuple(Grain(grain["type"], grain["value"], tuple(grain["span"]) if grain.get("span") else None) for grain in grains)


def drop_grain(query: MBeirQuery | Mapping, grain_type: str) -> str:
    """The query text without the words of one grain: the masked query of the grain-sensitivity measure.

    A modification loses its whole clause, and the "and" that joined it.
    """
    text, _, where = _text_and_grains(query)
    spans = [grain.span for grain in grains_of(query) if grain.type == grain_type and grain.span is not None]
    if not text or not spans:
        in_text = sorted({grain.type for grain in grains_of(query) if grain.span is not None})
        raise ValueError(f"{where}: no {grain_type!r} grain in the query text; grains with text spans: {in_text}")
    for start, end in sorted(spans, reverse=True):
        text = text[:start] + text[end:]
    words = text.split()
    while words and words[0] == "and":
        words.pop(0)
    while words and words[-1] == "and":
        words.pop()
    return " ".join(word for index, word in enumerate(words) if not (word == "and" and index > 0 and words[index - 1] == "and"))
