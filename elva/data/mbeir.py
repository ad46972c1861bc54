"""Readers for M-BEIR files as released (TIGER-Lab/M-BEIR), used unchanged for real and synthetic data.

The formats (UniIR ``src/data/mbeir_dataset.py``, LamRA ``dataset/datasets_mbeir.py``):

- query jsonl: ``qid`` ("{dataset_id}:{n}"), ``query_txt`` (or null), ``query_img_path`` (relative to the image root,
  or null), ``query_modality`` ("text" | "image" | "image,text"), ``query_src_content``, ``pos_cand_list`` and
  ``neg_cand_list`` (lists of did strings), ``task_id`` (int);
- candidate pool jsonl: ``did``, ``txt``, ``img_path``, ``modality``, ``src_content``;
- instruction table: a tsv with a header line, then ``query_modality, cand_modality, dataset, dataset_id, prompt...``.

Not M-BEIR: a captions jsonl (``img_path``, ``txt``) gives the summaries that the generative cold start teaches
(:func:`load_captions`); ``elva make-data`` writes one for the synthetic benchmark.

Every fault is reported as ``<file>:<1-based line>: <what is wrong>``. Fields a record carries beyond the standard
ones (the synthetic benchmark's ``grains``, for instance) are kept in ``extra``.

Images are checked eagerly when ``load_queries``/``load_pool`` get an ``image_root``; otherwise ``resolve_image``
checks one lazily, and still names the jsonl line that referenced it when given the record's ``origin``.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODALITIES = ("text", "image", "image,text")

# UniIR's MBEIR_TASK: task id -> (query modality, candidate modality). Task 5 exists in the table but no dataset uses it.
TASKS = {
    0: ("text", "image"),
    1: ("text", "text"),
    2: ("text", "image,text"),
    3: ("image", "text"),
    4: ("image", "image"),
    5: ("image", "image,text"),
    6: ("image,text", "text"),
    7: ("image,text", "image"),
    8: ("image,text", "image,text"),
}

_QUERY_FIELDS = ("qid", "query_txt", "query_img_path", "query_modality", "query_src_content", "pos_cand_list", "neg_cand_list", "task_id")
# Every released file has these; the source content and the negatives are unused by training, so they may be absent.
_QUERY_REQUIRED = ("qid", "query_txt", "query_img_path", "query_modality", "pos_cand_list", "task_id")
_CANDIDATE_FIELDS = ("did", "txt", "img_path", "modality", "src_content")
_CANDIDATE_REQUIRED = ("did", "txt", "img_path", "modality")


@dataclass(frozen=True)
class MBeirQuery:
    qid: str
    query_txt: str | None
    query_img_path: str | None
    query_modality: str
    pos_cand_list: tuple[str, ...]
    neg_cand_list: tuple[str, ...]
    task_id: int
    query_src_content: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # "<file>:<line>", for error messages raised after loading

    @property
    def dataset_id(self) -> str:
        return self.qid.split(":", 1)[0]


@dataclass(frozen=True)
class MBeirCandidate:
    did: str
    txt: str | None
    img_path: str | None
    modality: str
    src_content: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    origin: str = ""


@dataclass(frozen=True)
class InstructionTable:
    """Query instructions keyed by (dataset_id, query_modality, cand_modality), as UniIR and LamRA look them up."""

    path: Path
    prompts: dict[tuple[str, str, str], tuple[str, ...]]

    def lookup(self, dataset_id: str, query_modality: str, cand_modality: str) -> tuple[str, ...]:
        key = (str(dataset_id), query_modality, cand_modality)
        if key not in self.prompts:
            raise KeyError(f"{self.path}: no instruction for dataset_id={key[0]}, query_modality={key[1]!r}, cand_modality={key[2]!r}")
        return self.prompts[key]

    def for_query(self, query: MBeirQuery, positive: MBeirCandidate) -> tuple[str, ...]:
        """The prompt variants for a query; the key takes the candidate modality from its positive, as LamRA does."""
        return self.lookup(query.dataset_id, query.query_modality, positive.modality)


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record


def _require(record: dict, names: tuple[str, ...], where: str) -> None:
    missing = [name for name in names if name not in record]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {', '.join(missing)}")


def _check_modality(modality: Any, text: Any, image: Any, names: tuple[str, str, str], where: str) -> None:
    modality_name, text_name, image_name = names
    if modality not in MODALITIES:
        raise ValueError(f"{where}: {modality_name} must be one of {MODALITIES}, got {modality!r}")
    if "text" in modality and not isinstance(text, str):
        raise ValueError(f"{where}: {modality_name} is {modality!r} but {text_name} is {text!r}")
    if "image" in modality and not isinstance(image, str):
        raise ValueError(f"{where}: {modality_name} is {modality!r} but {image_name} is {image!r}")


def _did_list(value: Any, name: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(did, str) for did in value):
        raise ValueError(f"{where}: {name} must be a list of did strings, got {value!r}")
    return tuple(value)


def resolve_image(image_root: str | Path, relative_path: str, *, referenced_by: str = "") -> Path:
    """The image file at ``image_root / relative_path``; FileNotFoundError names ``referenced_by`` ("<file>:<line>")."""
    path = Path(image_root) / relative_path
    if not path.is_file():
        where = f"{referenced_by}: " if referenced_by else ""
        raise FileNotFoundError(f"{where}image {relative_path!r} not found under image root {image_root}")
    return path


def load_pool(path: str | Path, *, image_root: str | Path | None = None) -> dict[str, MBeirCandidate]:
    """A candidate pool jsonl as {did: candidate}, in file order; with ``image_root``, every image must exist."""
    path = Path(path)
    pool: dict[str, MBeirCandidate] = {}
    for line_number, record in _jsonl_records(path):
        where = f"{path}:{line_number}"
        _require(record, _CANDIDATE_REQUIRED, where)
        did = record["did"]
        if not isinstance(did, str):
            raise ValueError(f"{where}: did must be a string, got {did!r}")
        if did in pool:
            raise ValueError(f"{where}: duplicate did {did!r} (first at {pool[did].origin})")
        _check_modality(record["modality"], record["txt"], record["img_path"], ("modality", "txt", "img_path"), where)
        if image_root is not None and "image" in record["modality"]:
            resolve_image(image_root, record["img_path"], referenced_by=where)
        pool[did] = MBeirCandidate(
            did=did,
            txt=record["txt"],
            img_path=record["img_path"],
            modality=record["modality"],
            src_content=record.get("src_content"),
            extra={k: v for k, v in record.items() if k not in _CANDIDATE_FIELDS},
            origin=where,
        )
    return pool


def load_queries(
    path: str | Path,
    *,
    pool: Mapping[str, MBeirCandidate] | None = None,
    image_root: str | Path | None = None,
) -> list[MBeirQuery]:
    """A query jsonl, in file order.

    With ``pool``, every id in ``pos_cand_list`` must be in it (negatives are not checked: training never reads them).
    With ``image_root``, every query image must exist.
    """
    path = Path(path)
    queries: list[MBeirQuery] = []
    for line_number, record in _jsonl_records(path):
        where = f"{path}:{line_number}"
        _require(record, _QUERY_REQUIRED, where)
        if not isinstance(record["qid"], str):
            raise ValueError(f"{where}: qid must be a string, got {record['qid']!r}")
        modality = record["query_modality"]
        _check_modality(modality, record["query_txt"], record["query_img_path"], ("query_modality", "query_txt", "query_img_path"), where)
        task_id = record["task_id"]
        if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id not in TASKS:
            raise ValueError(f"{where}: task_id must be an M-BEIR task id {sorted(TASKS)}, got {task_id!r}")
        positives = _did_list(record["pos_cand_list"], "pos_cand_list", where)
        if not positives:
            raise ValueError(f"{where}: pos_cand_list is empty")
        negatives = _did_list(record.get("neg_cand_list", []), "neg_cand_list", where)
        if pool is not None:
            unknown = [did for did in positives if did not in pool]
            if unknown:
                raise ValueError(f"{where}: pos_cand_list has candidate id(s) not in the pool: {', '.join(unknown)}")
        if image_root is not None and "image" in modality:
            resolve_image(image_root, record["query_img_path"], referenced_by=where)
        queries.append(
            MBeirQuery(
                qid=record["qid"],
                query_txt=record["query_txt"],
                query_img_path=record["query_img_path"],
                query_modality=modality,
                pos_cand_list=positives,
                neg_cand_list=negatives,
                task_id=task_id,
                query_src_content=record.get("query_src_content"),
                extra={k: v for k, v in record.items() if k not in _QUERY_FIELDS},
                origin=where,
            )
        )
    return queries


def load_instructions(path: str | Path) -> InstructionTable:
    """The instruction tsv. Line 1 is a header; each row needs the four key columns and at least one prompt."""
    path = Path(path)
    prompts: dict[tuple[str, str, str], tuple[str, ...]] = {}
    first_seen: dict[tuple[str, str, str], int] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line_number == 1 or not line.strip():
                continue
            columns = line.rstrip("\r\n").split("\t")
            variants = tuple(column.strip() for column in columns[4:] if column.strip())
            if len(columns) < 4 or not variants:
                raise ValueError(
                    f"{path}:{line_number}: expected query_modality, cand_modality, dataset, dataset_id and at least one "
                    f"prompt, tab-separated; got {len(columns)} column(s)"
                )
            key = (columns[3].strip(), columns[0].strip(), columns[1].strip())
            if key in prompts:
                raise ValueError(f"{path}:{line_number}: duplicate instruction key {key} (first at line {first_seen[key]})")
            prompts[key] = variants
            first_seen[key] = line_number
    return InstructionTable(path=path, prompts=prompts)


def load_captions(path: str | Path) -> dict[str, str]:
    """A captions jsonl as {img_path: caption}: one ``{"img_path": ..., "txt": ...}`` per line, each image once."""
    path = Path(path)
    captions: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    for line_number, record in _jsonl_records(path):
        where = f"{path}:{line_number}"
        _require(record, ("img_path", "txt"), where)
        image, text = record["img_path"], record["txt"]
        if not isinstance(image, str) or not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: img_path and txt must be strings and txt non-empty; got {image!r}, {text!r}")
        if image in captions:
            raise ValueError(f"{where}: duplicate img_path {image!r} (first at line {first_seen[image]})")
        captions[image] = text
        first_seen[image] = line_number
    return captions
