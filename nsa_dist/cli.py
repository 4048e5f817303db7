"""``nsa-dist`` command line: ``nsa-dist train --config ...``, ``nsa-dist export-hf --checkpoint ... --out ...``."""
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
    export = commands.add_parser("export-hf", help="convert a training checkpoint.pt into a Hugging Face model "
                                                   "directory (needs the hf extra)")
    export.add_argument("--checkpoint", required=True, help="the plain training job's checkpoint.pt")
    export.add_argument("--out", required=True, help="directory for config.json and model.safetensors")
    args = parser.parse_args(argv)
    if args.command == "train":
        run_from_args(args)
    elif args.command == "export-hf":
        from .hf import convert_checkpoint  # imports transformers: only for this command

        convert_checkpoint(args.checkpoint, args.out)


if __name__ == "__main__":
    main()
