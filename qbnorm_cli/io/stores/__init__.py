"""The stores an index export is written to (io/indexfile.py writes and opens exports through
them): one module per store, each a class that `Store` (stores/base.py) describes. `STORES`
lists them, in the order `--format` offers them; everything else (the formats, the search
backends, the extras) is derived from it. Adding a store is adding its module and one entry here.
"""

from __future__ import annotations

from qbnorm_cli.io.stores.base import Store
from qbnorm_cli.io.stores.faissindex import FaissIndex
from qbnorm_cli.io.stores.hdf5file import Hdf5File
from qbnorm_cli.io.stores.lancetable import LanceTable
from qbnorm_cli.io.stores.npydirectory import NpyDirectory

STORES: dict[str, Store] = {store.name: store for store in (Hdf5File(), NpyDirectory(), FaissIndex(), LanceTable())}
