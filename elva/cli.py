"""The ``elva`` command: data, training, evaluation, mining, environment report and the demo."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path


def _embedder(model: str | None, seed: int):
    """A saved model folder, or the built-in tiny model (untrained) when none is given."""
    from elva.model import ElvaEmbedder

    return ElvaEmbedder.from_pretrained(model) if model else ElvaEmbedder.tiny(seed=seed)


def _make_data(args) -> None:
    from elva.data.synthetic import make_multigrain

    manifest = make_multigrain(Path(args.out), seed=args.seed, scenes=args.scenes, image_size=args.image_size)
    print(f"synthetic multi-grain benchmark in {manifest.root}")


def _train(args) -> None:
    from elva.config import load_config
    from elva.train import run_stage

    variables = {name: value for name, value in (("data_dir", args.data_dir), ("model_path", args.model_path)) if value}
    overrides = [*args.overrides, *(["train.resume=true"] if args.resume else [])]
    print(f"model: {run_stage(load_config(args.config, overrides, variables))}")


def _eval(args) -> None:
    from elva.eval import evaluate, format_table

    result = evaluate(_embedder(args.model, args.seed), args.data, args.out, batch_size=args.batch_size,
                      split=args.split, extraction=args.extraction)
    for name in ("recall", "multigrain", "grains"):
        if result.get(name):
            print(f"\n{name}\n{format_table(result[name])}")


def _mine(args) -> None:
    from elva.mine import mine

    path = mine(_embedder(args.model, args.seed), args.data, args.out, split=args.split, n_hard=args.n_hard,
                n_random=args.n_random, max_score=args.max_score, seed=args.seed, batch_size=args.batch_size)
    print(f"negatives: {path}")


def _info(args) -> None:
    import sys

    import torch

    import elva_kernels
    from elva.model import resolve_attention

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"device {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print(f"attention implementation: {resolve_attention('auto')}\n")
    elva_kernels.info()


def _kernels(args) -> None:
    from elva import kernel_demo

    kernel_demo.run(args.queries, args.candidates, args.dim, args.k, seed=args.seed)


def _bench(args) -> None:
    if args.what == "rl":
        from elva.bench import bench_rl

        r = bench_rl(args.size, queries=args.queries, group_size=args.group_size, candidates=args.candidates,
                     max_new_tokens=args.max_new_tokens, steps=args.steps, image_size=args.image_size,
                     text_words=args.text_words, seed=args.seed)
        memory = f"{r.peak_memory_mib:.0f} MiB" if r.peak_memory_mib is not None else "n/a (CPU)"
        print(f"stage-3 GRPO, Qwen2-VL {r.size} (random weights), {r.queries} queries x {r.group_size} rollouts, "
              f"{r.candidates} candidates, <= {r.max_new_tokens} summary tokens, {r.device}: {r.step_ms:.1f} ms/step "
              f"(rollouts {r.rollout_ms:.1f} ms), {r.rollouts_per_s:.2f} rollouts/s, peak memory {memory}")
        return
    from elva.bench import bench_train

    result = bench_train(args.size, batch_size=args.batch_size, steps=args.steps, image_size=args.image_size,
                         text_words=args.text_words, seed=args.seed)
    memory = f"{result.peak_memory_mib:.0f} MiB" if result.peak_memory_mib is not None else "n/a (CPU)"
    mfu = f"{100 * result.mfu:.1f}%" if result.mfu is not None else "n/a (no bf16 peak for this device)"
    print(f"stage-2 training, Qwen2-VL {result.size} (random weights), batch {result.batch_size}, {result.device}: "
          f"{result.step_ms:.1f} ms/step, {result.tokens_per_s:.0f} tokens/s, peak memory {memory}, MFU {mfu}")


def _run_dir(args, name: str) -> Path:
    import time

    return Path(args.run_dir) if args.run_dir else Path("runs") / time.strftime(f"{name}-%Y%m%d-%H%M%S")


def _demo(args) -> None:
    from elva import demo

    demo.run(_run_dir(args, "demo"), seed=args.seed, scenes=args.scenes)


def _compare(args) -> None:
    from elva import demo

    demo.compare(_run_dir(args, "compare"), args.seeds, scenes=args.scenes)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="elva", description="ELVA: ranking-driven multimodal retrieval")
    commands = parser.add_subparsers(dest="command", required=True)

    make_data = commands.add_parser("make-data", help="write the synthetic multi-grain benchmark (M-BEIR format)")
    make_data.add_argument("--out", required=True)
    make_data.add_argument("--scenes", type=int, default=200)
    make_data.add_argument("--image-size", type=int, default=56)
    make_data.set_defaults(run=_make_data)

    train = commands.add_parser("train", help="a training stage, chosen by the config (train.stage)")
    train.add_argument("--config", required=True)
    train.add_argument("--data-dir", help="fills ${data_dir} in the config (e.g. the folder of elva make-data)")
    train.add_argument("--model-path", help="fills ${model_path} (a local Qwen2-VL checkpoint folder)")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=1e-4 train.resume=true")
    train.set_defaults(run=_train)

    for name, helptext, run in (("eval", "Recall@k, multi-grain R@5 and grain sensitivity", _eval),
                                ("mine", "balanced negatives (A5) per query, cached as jsonl", _mine)):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("--data", required=True, help="a synthetic root (manifest.json) or an M-BEIR folder")
        sub.add_argument("--model", help="a saved model folder (default: the untrained tiny model)")
        sub.add_argument("--out", required=True)
        sub.add_argument("--split", default="test" if name == "eval" else "train")
        sub.add_argument("--batch-size", type=int, default=32)
        sub.set_defaults(run=run)
        if name == "eval":
            sub.add_argument("--extraction", choices=["emb", "generative"], default=None,
                             help="emb (<emb>) or generative (summary then [RET]); default: the model's own")
        if name == "mine":
            sub.add_argument("--n-hard", type=int, default=50)
            sub.add_argument("--n-random", type=int, default=50)
            sub.add_argument("--max-score", type=float, default=None, help="skip near-duplicates above this cosine")

    commands.add_parser("info", help="versions, device, attention, and the backend of each op").set_defaults(run=_info)

    kernels = commands.add_parser("kernels", help="every op's reference against the backend auto picks here")
    kernels.add_argument("--queries", type=int, default=512)
    kernels.add_argument("--candidates", type=int, default=100_000)
    kernels.add_argument("--dim", type=int, default=128)
    kernels.add_argument("--k", type=int, default=10)
    kernels.set_defaults(run=_kernels)

    bench = commands.add_parser("bench", help="throughput of stage-2 (`train`) or stage-3 (`rl`) steps, random "
                                              "weights")
    bench.add_argument("what", choices=["train", "rl"])
    bench.add_argument("--size", choices=["2b", "tiny"], default="2b")
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--steps", type=int, default=10)
    bench.add_argument("--image-size", type=int, default=224)
    bench.add_argument("--text-words", type=int, default=32)
    bench.add_argument("--queries", type=int, default=8, help="rl: queries per step")
    bench.add_argument("--group-size", type=int, default=8, help="rl: rollouts per query")
    bench.add_argument("--candidates", type=int, default=101, help="rl: candidates per query")
    bench.add_argument("--max-new-tokens", type=int, default=32, help="rl: summary tokens per rollout")
    bench.set_defaults(run=_bench)

    demo = commands.add_parser("demo", help="the whole pipeline on the tiny model and synthetic data (CPU, minutes)")
    demo.add_argument("--run-dir", help="default: runs/demo-<date>-<time>")
    demo.add_argument("--scenes", type=int, default=200)
    demo.set_defaults(run=_demo)

    compare = commands.add_parser("compare", help="the demo over several seeds: stage 2 vs stage 3, mean and std")
    compare.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    compare.add_argument("--run-dir", help="default: runs/compare-<date>-<time>")
    compare.add_argument("--scenes", type=int, default=200)
    compare.set_defaults(run=_compare)

    for sub in (make_data, kernels, demo, bench, *(commands.choices[n] for n in ("eval", "mine"))):
        sub.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
