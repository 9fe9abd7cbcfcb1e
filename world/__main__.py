"""`python -m world COMMAND`: the miniature world's commands (docs/world.md)."""
from __future__ import annotations

import argparse
import sys

from . import gates, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m world", description=__doc__.split(":")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_arguments(sub.add_parser("train", help="pretrain the world's U-Net (resumable)"))
    gates.add_arguments(sub.add_parser("gates", help="sample plain prompts through the host and read them back"))
    args = parser.parse_args(argv)
    return {"train": train.run, "gates": gates.run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
