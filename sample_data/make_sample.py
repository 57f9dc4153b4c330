"""Cut sample_data/multi30k-sample.h5 from ../shared/data/multi30k-de2en-e5.h5 (run from the repo root).

The sample keeps the real model's geometry and hubness at a few MB: the first 200 test images
(1000 German queries, 200 English gallery captions), the first 2000 German training captions
(a query-bank pool), the first 2000 English training captions (a gallery-bank pool), and the
first 100 validation images (500 queries, 100 gallery captions) for tuning.
"""

import sys
from pathlib import Path

import h5py
import numpy as np

SOURCE = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/multi30k-de2en-e5.h5")
TARGET = Path(__file__).with_name("multi30k-sample.h5")
IMAGES, VAL_IMAGES, TRAIN = 200, 100, 2000


def main() -> None:
    with h5py.File(SOURCE, "r") as src, h5py.File(TARGET, "w") as out:
        cuts = {
            "queries": slice(0, 5 * IMAGES), "gallery": slice(0, IMAGES), "gt": slice(0, 5 * IMAGES),
            "val_queries": slice(0, 5 * VAL_IMAGES), "val_gallery": slice(0, VAL_IMAGES),
            "val_gt": slice(0, 5 * VAL_IMAGES),
            "train_queries": slice(0, TRAIN), "train_gallery": slice(0, TRAIN),
        }
        for name, cut in cuts.items():
            out.create_dataset(name, data=src[name][cut])
            if f"text/{name}" in src:
                out.create_dataset(f"text/{name}", data=src[f"text/{name}"][cut])
        # The ground truth of the first images of a split stays valid: row 5i..5i+4 ↔ image i.
        assert (out["gt"][()] == np.arange(5 * IMAGES) // 5).all()
        assert out["val_gt"][()].max() < VAL_IMAGES
        out.attrs["source"] = f"{SOURCE.name} ({src.attrs['source']})"
        out.attrs["model"] = src.attrs["model"]
        out.attrs["similarity"] = src.attrs["similarity"]
        out.attrs["cut"] = (f"first {IMAGES} test images, first {VAL_IMAGES} validation images, "
                            f"first {TRAIN} training queries and gallery captions")
        out.attrs["made_by"] = "sample_data/make_sample.py"
    print(f"wrote {TARGET} ({TARGET.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
