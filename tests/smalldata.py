"""A small pipeline on disk for CLI tests that run every command: data.h5 (train, test and
validation splits with ground truth), bank.h5, gbank.h5, probe.h5, and the gallery with its rows
reversed (g_perm.npy: the same size, other data)."""

from __future__ import annotations

import h5py
import numpy as np

from qbnorm_cli.cli import main


def small_pipeline(d) -> dict:
    rng = np.random.default_rng(23)
    arrays = {name: rng.normal(size=(n, 8)).astype(np.float32) for name, n in [
        ("train_queries", 60), ("train_gallery", 50), ("queries", 20), ("gallery", 30),
        ("val_queries", 20), ("val_gallery", 30)]}
    with h5py.File(d / "data.h5", "w") as h5:
        for name, arr in arrays.items():
            h5.create_dataset(name, data=arr)
        h5.create_dataset("gt", data=np.arange(20) % 30)
        h5.create_dataset("val_gt", data=(np.arange(20) * 7) % 30)
    np.save(d / "g_perm.npy", arrays["gallery"][::-1])
    np.save(d / "sims.npy", arrays["queries"] @ arrays["gallery"].T)
    data = str(d / "data.h5")
    for args in (["build-bank", f"{data}::/train_queries", "-o", d / "bank.h5", "--size", "40"],
                 ["build-bank", f"{data}::/train_gallery", "-o", d / "gbank.h5", "--size", "30"],
                 ["probe", "--bank", d / "bank.h5", "--gallery", f"{data}::/gallery", "-o", d / "probe.h5"]):
        assert main([str(a) for a in [*args, "-q"]]) == 0
    return {"dir": d, "data": data}
