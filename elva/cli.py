"""The ``elva`` command."""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elva", description="ELVA retrieval kernels and trainer")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="kernel demo on a synthetic retrieval problem")
    demo.add_argument("--queries", type=int, default=512)
    demo.add_argument("--candidates", type=int, default=100_000)
    demo.add_argument("--dim", type=int, default=128)
    demo.add_argument("--k", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    commands.add_parser("info", help="which backend serves each op here, and why the others cannot")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from elva import demo as demo_module

        demo_module.run(args.queries, args.candidates, args.dim, args.k, seed=args.seed)
    elif args.command == "info":
        import elva_kernels

        elva_kernels.info()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
