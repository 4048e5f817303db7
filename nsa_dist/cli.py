"""``nsa-dist`` command line: ``nsa-dist train --config ...``, ``nsa-dist export-hf --checkpoint ... --out ...``."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

from . import __version__
from .train import add_train_arguments, run_from_args


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="nsa-dist", description="Native Sparse Attention for long-context training")
    parser.add_argument("--version", action="version", version=f"nsa-dist {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the compact GPT (the main job)")
    add_train_arguments(train)
    export = commands.add_parser("export-hf", help="convert a training checkpoint (checkpoint.pt or a DeepSpeed "
                                                   "checkpoint directory) into a Hugging Face model directory "
                                                   "(needs the hf extra)")
    export.add_argument("--checkpoint", required=True, help="the plain training job's checkpoint.pt, or the DeepSpeed "
                                                            "job's checkpoint directory <out_dir>/checkpoints")
    export.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag, e.g. step100 (default: the one the "
                                                    "directory's 'latest' file names)")
    export.add_argument("--out", required=True, help="directory for config.json, model.safetensors and (byte-level "
                                                     "text models) tokenizer_config.json")
    args = parser.parse_args(argv)
    if args.command == "train":
        run_from_args(args)
    elif args.command == "export-hf":
        from .hf import convert_checkpoint  # imports transformers: only for this command

        convert_checkpoint(args.checkpoint, args.out, tag=args.tag)
        written = sorted(p.name for p in Path(args.out).iterdir() if p.is_file())
        print(f"nsa-dist export-hf: wrote {args.out}: {', '.join(written)}")


if __name__ == "__main__":
    main()
