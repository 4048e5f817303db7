"""Write a Megatron indexed dataset (PREFIX.bin / PREFIX.idx) of byte-level tokens from text files, offline.

Each file is one document: its UTF-8 bytes (tokens 0..255) followed by the end-of-document token 256, so the
vocabulary is 257 (``pretrain_gpt_nsa.py --vocab-size 257 --data-path PREFIX``). ``--split-lines`` makes every
non-empty line a document instead.

    python examples/megatron/make_byte_dataset.py --output data/corpus_bytes corpus/*.txt
"""
import argparse
import os

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

EOD = 256


def documents(paths, split_lines):
    """Byte strings, one per document: whole files, or their non-empty lines."""
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        if split_lines:
            yield from (line for line in data.splitlines() if line.strip())
        elif data:
            yield data


def write_byte_dataset(paths, prefix, split_lines=False):
    """Write PREFIX.bin / PREFIX.idx (uint16 tokens) and return (documents, tokens) written."""
    if os.path.dirname(prefix):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=numpy.uint16)
    num_docs = num_tokens = 0
    for doc in documents(paths, split_lines):
        tokens = numpy.append(numpy.frombuffer(doc, dtype=numpy.uint8).astype(numpy.int64), EOD)
        builder.add_document(torch.from_numpy(tokens), [len(tokens)])
        num_docs, num_tokens = num_docs + 1, num_tokens + len(tokens)
    if num_docs == 0:
        raise ValueError(f"no text in {paths}: nothing to write")
    builder.finalize(get_idx_path(prefix))
    return num_docs, num_tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="text files")
    p.add_argument("--output", required=True, help="dataset prefix: writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--split-lines", action="store_true", help="one document per non-empty line")
    args = p.parse_args(argv)
    num_docs, num_tokens = write_byte_dataset(args.files, args.output, args.split_lines)
    print(f"wrote {args.output}.bin/.idx: {num_docs} documents, {num_tokens} tokens (vocab 257, eod {EOD})")


if __name__ == "__main__":
    main()
