#!/usr/bin/env python
"""How many grains the greedy summaries of generative models get right, on the synthetic multi-grain benchmark.

    python benchmarks/summary_grains.py --data runs/demo/data coldstart=runs/demo/coldstart/model \
        stage3=runs/demo/stage3/model

Each query of the split is summarised greedily (its task instruction, the model's summary cap), as ``elva eval``
does through ``[RET]``. The reference is the caption of the query's positive: the scene a text or image query
shows, or the scene an (image, text) query asks for, which is what the generative cold start teaches. A grain
counts as right when its words in that caption ("two", "large", "red", "circles", "at the left", "on a grey
background") appear in the summary as a run of whole words. Prints and returns, per task and overall, the fraction
of grains right and of summaries with all six right.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def grain_phrases(candidate) -> dict[str, list[str]]:
    """The words of each grain in the caption of a candidate's scene."""
    from elva.data.synthetic import GRAIN_TYPES, Scene, caption

    values = {grain["type"]: grain["value"] for grain in candidate.extra["grains"]}
    text, grains = caption(Scene(*(values[grain] for grain in GRAIN_TYPES)))
    return {grain["type"]: text[grain["span"][0]:grain["span"][1]].split() for grain in grains}


def contains(words: list[str], phrase: list[str]) -> bool:
    return any(words[i:i + len(phrase)] == phrase for i in range(len(words) - len(phrase) + 1))


def summary_grains(model, data_root: Path, split: str = "test", batch_size: int = 32) -> list[dict]:
    from elva.data.mbeir import load_instructions, load_pool, load_queries
    from elva.data.synthetic import TASK_KINDS
    from elva.eval.retrieval import TASK_NAMES, query_instruction, query_item

    pool = load_pool(data_root / f"cand_pool/global/mbeir_multigrain_{split}_cand_pool.jsonl")
    instructions = load_instructions(data_root / "instructions/query_instructions.tsv")
    rows, right, whole, total = [], 0, 0, 0
    for task in TASK_KINDS:
        queries = load_queries(data_root / f"query/{split}/mbeir_multigrain_task{task}_{split}.jsonl", pool=pool)
        task_right = task_whole = 0
        for start in range(0, len(queries), batch_size):
            chunk = queries[start:start + batch_size]
            generation = model.generate_embed([query_item(q, data_root) for q in chunk],
                                              [query_instruction(q, instructions, pool) for q in chunk],
                                              max_new_tokens=model.config.generative_max_new_tokens)
            for query, ids, end in zip(chunk, generation.completion_ids, generation.ret_index):
                words = model.tokenizer.decode(ids[:end]).split()
                hits = [contains(words, phrase) for phrase in grain_phrases(pool[query.pos_cand_list[0]]).values()]
                task_right += sum(hits)
                task_whole += all(hits)
        rows.append({"task": task, "task_name": TASK_NAMES.get(task, str(task)), "n_queries": len(queries),
                     "grains_right": task_right / (6 * len(queries)), "all_six_right": task_whole / len(queries)})
        right, whole, total = right + task_right, whole + task_whole, total + len(queries)
    rows.append({"task": "mean", "task_name": "all", "n_queries": total, "grains_right": right / (6 * total),
                 "all_six_right": whole / total})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a synthetic benchmark folder (elva make-data)")
    parser.add_argument("--split", default="test")
    parser.add_argument("models", nargs="+", help="label=model folder, read with its own summary cap")
    args = parser.parse_args(argv)
    from elva.eval import format_table
    from elva.model import ElvaEmbedder

    for spec in args.models:
        label, _, path = spec.partition("=")
        if not path:
            parser.error(f"models must look like label=folder; got {spec!r}")
        rows = summary_grains(ElvaEmbedder.from_pretrained(path, lora_r=0), args.data, args.split)
        print(f"\n{label}: greedy summaries against the positive's caption ({args.split} split)\n{format_table(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
