"""`python -m world COMMAND`: the miniature world's commands (docs/world.md)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import gates, train
from .third import gates as third_gates


def run_gates(args: argparse.Namespace) -> int:
    """The second world's gates, or the third's with --world third (world.gates never imports the third world's,
    which builds on it)."""
    return (third_gates.run if args.world == "third" else gates.run)(args)


def write_checkpoint(args: argparse.Namespace) -> int:
    from host_boot import embedded_host
    embedded_host.import_host_modules()
    from . import checkpoint
    print(checkpoint.ensure(args.folder))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m world", description=__doc__.split(":")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_arguments(sub.add_parser("train", help="pretrain the world's U-Net (resumable)"))
    gate_parser = sub.add_parser("gates", help="sample plain prompts through the host and read them back")
    gates.add_arguments(gate_parser)
    third_gates.add_arguments(gate_parser.add_argument_group("third world"))
    assemble = sub.add_parser("checkpoint", help="assemble world-sd15.safetensors from the committed U-Net weights")
    assemble.add_argument("folder", type=Path, help="e.g. models/checkpoints (rebuilt only when out of date)")
    args = parser.parse_args(argv)
    return {"train": train.run, "gates": run_gates, "checkpoint": write_checkpoint}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
