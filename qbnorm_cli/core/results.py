"""What the library hands back besides plain arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ranking:
    """Each query's top-N gallery items, best first (ties towards the lower index), as
    `qbnorm_cli.normalise(…, top_k=N)` returns them and a ranking file stores them.

    indices: (Q, N) int, −1 in an empty slot; scores: (Q, N) their (normalised) scores;
    normalised: (Q,) bool, which rows the method normalised (the others keep raw scores);
    gallery_rows: the gallery's size (the anti-hub measures of `hubness` need it).
    """

    indices: np.ndarray
    scores: np.ndarray
    normalised: np.ndarray
    gallery_rows: int

    def __len__(self) -> int:
        return len(self.indices)
