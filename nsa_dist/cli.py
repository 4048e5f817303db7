"""``nsa-dist`` command line: ``nsa-dist train --config ...``."""
from __future__ import annotations

import argparse
from typing import List, Optional

from . import __version__
from .train import add_train_arguments, run_from_args


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="nsa-dist", description="Native Sparse Attention for long-context training")
    parser.add_argument("--version", action="version", version=f"nsa-dist {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the compact GPT (the main job)")
    add_train_arguments(train)
    args = parser.parse_args(argv)
    if args.command == "train":
        run_from_args(args)


if __name__ == "__main__":
    main()
