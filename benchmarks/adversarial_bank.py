"""Build the adversarial query bank of QB-Norm (Bogolin et al., CVPR 2022): a bank that covers
almost none of the gallery, to see `qbnorm probe` warn about it and how the methods fare.

Training queries are grouped by their raw top-1 gallery item; the bank takes every query whose
top-1 is the most retrieved item, then those of the next most retrieved item, and so on until it
holds --size queries. Run from the repository root:

    python benchmarks/adversarial_bank.py ../shared/data/multi30k-de2en-e5.h5 -o /tmp/adv_bank.h5
    qbnorm probe --bank /tmp/adv_bank.h5 --gallery ../shared/data/multi30k-de2en-e5.h5::/gallery \\
        -o /tmp/adv_probe.h5 --beta 100          # → warning: low bank coverage …
"""

from __future__ import annotations

import argparse

import numpy as np

from qbnorm_cli.io.atomic import OutputFile
from qbnorm_cli.io.specs import open_array


def raw_top1(queries: np.ndarray, gallery: np.ndarray, block: int = 4096) -> np.ndarray:
    """Each query's best gallery item by cosine similarity (ties: the lower index)."""
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    top = np.empty(len(queries), dtype=np.int64)
    for r0 in range(0, len(queries), block):
        q = queries[r0:r0 + block]
        top[r0:r0 + block] = np.argmax((q / np.linalg.norm(q, axis=1, keepdims=True)) @ gallery.T, axis=1)
    return top


def adversarial_rows(top1: np.ndarray, size: int) -> np.ndarray:
    """Rows of the queries retrieving the most retrieved item, then the next, … (`size` of them)."""
    counts = np.bincount(top1)
    order = np.argsort(-counts, kind="stable")
    rows = np.concatenate([np.nonzero(top1 == item)[0] for item in order if counts[item]])
    return np.sort(rows[:size])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="HDF5 file with the training queries and the gallery")
    parser.add_argument("-o", "--output", required=True, help="bank file to write (qbnorm kind bank)")
    parser.add_argument("--queries", default="/train_queries", help="dataset of the candidate queries")
    parser.add_argument("--gallery", default="/gallery", help="dataset of the gallery to be probed")
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    source = open_array(f"{args.data}::{args.queries}")
    gallery = open_array(f"{args.data}::{args.gallery}")
    queries = source.read()
    top1 = raw_top1(queries, gallery.read())
    rows = adversarial_rows(top1, args.size)
    params = {"strategy": "adversarial (QB-Norm): queries of the most retrieved gallery items first",
              "size": len(rows), "gallery": gallery.label}
    with OutputFile(args.output, "bank", force=args.force, params=params, inputs=[source, gallery]) as out:
        out.create("/embeddings", data=queries[rows])
        out.create("/source_index", data=rows)
    items = np.unique(top1[rows]).size
    print(f"wrote {args.output}: {len(rows)} queries whose raw top-1 is one of {items} gallery items "
          f"(of {gallery.rows})")


if __name__ == "__main__":
    main()
