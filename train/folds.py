"""k-fold cross-validation by patient: every patient is held out exactly once.

A patient's studies stay on one side of a split. The assignment is stratified so that each
fold holds a mix of what matters for the scores: patients with a study as acquired (skull,
scanner grid, slabs), patients with an expert's lesion mask, and the rest. Within each
stratum patients are shuffled with a fixed seed and dealt round-robin, the next stratum
continuing where the last one stopped, so fold sizes differ by one at most and a given list
of patients always gives the same folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from train.pairs import PairedVolume, StudyGroup

DEFAULT_FOLDS = 5
FOLD_SEED = 0


@dataclass(frozen=True)
class Fold:
    number: int  # from 1
    held_out: tuple[str, ...]  # patient pseudonyms

    def name(self) -> str:
        return f"fold-{self.number}"


def patient_folds(
    paired: Sequence[PairedVolume], count: int = DEFAULT_FOLDS, seed: int = FOLD_SEED
) -> list[Fold]:
    """``count`` folds over the patients of ``paired``. Raises ValueError for fewer
    patients than folds."""
    strata: dict[str, int] = {}
    for item in paired:
        rank = 2
        if item.lesions is not None and item.lesions.any():
            rank = 1
        if item.group is StudyGroup.AS_ACQUIRED:
            rank = 0
        strata[item.pair.patient] = min(rank, strata.get(item.pair.patient, rank))
    if len(strata) < count:
        raise ValueError(f"{count} folds need at least {count} patients, found {len(strata)}")
    rng = np.random.default_rng(seed)
    dealt: list[list[str]] = [[] for _ in range(count)]
    turn = 0
    for rank in sorted(set(strata.values())):
        members = sorted(patient for patient, r in strata.items() if r == rank)
        for index in rng.permutation(len(members)):
            dealt[turn % count].append(members[index])
            turn += 1
    return [Fold(number + 1, tuple(sorted(held))) for number, held in enumerate(dealt)]
