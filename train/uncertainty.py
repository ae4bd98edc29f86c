"""How well the node's uncertainty finds its own errors, on held-out patients.

For each model and each of its held-out studies: the node's synthesis with its Monte-Carlo
dropout spread (``Synthesizer.synthesize_with_spread``, as the worker runs it) or, with
several models of one fold (seeds), the spread of their outputs (an ensemble); the error
against the real target in the network's output space, inside the head. Reported:

- per series: Spearman's rank correlation between the series uncertainty
  (``pipeline.model.uncertainty.series_uncertainty``, what a route holds series by) and the
  series error (mean absolute error inside the head, and 1 - correlation as the monitor
  scores it), over every held-out series of a direction;
- per voxel: the AUROC of the spread for the largest errors (the worst 10% inside the head
  of each series), for lesion voxels (expert or FLAIR masks, ``train.lesions``) against the
  rest of the head, and for lesion voxels that faded (lesion voxels among the largest
  errors).

k-fold models (``train.ablation`` keeps them under OUT/models/<direction>/<config>/seed-N/
fold-K.pt, their held-out patients in OUT/folds.json)::

    .venv/bin/python -m train.uncertainty ../shared/data/mr-brain ../shared/data/mr-brain-more \\
        --kfold var/kfold --configs v5-b16 --lesions ../shared/data/lesions var/flair-masks

or models whose training never saw DATA (``--model``, several for an ensemble)::

    .venv/bin/python -m train.uncertainty ../shared/data/mr-brain-more \\
        --model models/t1-to-t2/v7.pt --lesions ../shared/data/lesions
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from pipeline.dicom.contrast import Direction
from pipeline.model.card import LoadedModel, load_model
from pipeline.model.inference import Synthesizer, use_threads
from pipeline.model.preprocess import normalize_volume
from pipeline.model.scores import minmax_slices, slice_metrics
from pipeline.model.uncertainty import series_uncertainty
from train.lesions import LesionMasks
from train.pairs import PairedVolume, StudyPair, find_pairs, load_pair

# The largest errors: this top fraction of a series' voxels inside the head.
LARGE_ERROR_FRACTION = 0.10
# Voxels per series the AUROCs are computed on (a random sample beyond it, seeded).
MAX_VOXELS = 500_000


@dataclass(frozen=True)
class SeriesResult:
    label: str
    patient: str
    direction: str
    models: str  # which model(s): a file, or a fold's seeds
    method: str  # mc-dropout or ensemble
    uncertainty: float
    mae: float
    one_minus_correlation: float
    auroc_large_error: float
    auroc_lesion: float | None  # None: no lesion mask on the kept slices
    auroc_faded_lesion: float | None


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positive`` (ties count half), by ranks;
    None when either class is empty."""
    positives = int(positive.sum())
    negatives = positive.size - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = stats.rankdata(scores)
    return float(
        (ranks[positive].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    )


def measure(
    item: PairedVolume, models: Sequence[LoadedModel], passes: int, label: str
) -> SeriesResult:
    """One held-out series: MC dropout with one model, the ensemble's spread with several."""
    source = item.source
    synthesizers = [Synthesizer(model) for model in models]
    volume = np.asarray(source.pixels)
    if len(synthesizers) == 1:
        output, spread = synthesizers[0].synthesize_with_spread(
            volume, source.pixel_spacing, source.slice_offsets, passes
        )
        method = f"mc-dropout ({passes} passes)"
    else:
        outputs = [
            s.synthesize(volume, source.pixel_spacing, source.slice_offsets) for s in synthesizers
        ]
        output, spread = outputs[0], np.std(np.stack(outputs), axis=0)
        method = f"ensemble ({len(outputs)} models)"
    keep = item.slices
    head = (item.head & item.covered)[keep]
    target = normalize_volume(item.target, models[0].card.output_normalization)[keep]
    error = np.abs(output[keep] - target)
    per_slice = slice_metrics(
        minmax_slices(output[keep]), minmax_slices(item.target[keep]), item.covered[keep], head
    )
    error_in_head, spread_in_head = error[head], spread[keep][head]
    large = error_in_head >= np.quantile(error_in_head, 1 - LARGE_ERROR_FRACTION)
    sample = _sample(error_in_head.size)
    lesion_auc = faded_auc = None
    if item.lesions is not None:
        lesion = item.lesions[keep][head]
        lesion_auc = auroc(spread_in_head[sample], lesion[sample])
        faded_auc = auroc(spread_in_head[sample], (lesion & large)[sample])
    return SeriesResult(
        label=item.pair.label,
        patient=item.pair.patient,
        direction=str(item.direction),
        models=label,
        method=method,
        uncertainty=series_uncertainty(output, spread, item.head),
        mae=float(error_in_head.mean()),
        one_minus_correlation=1.0 - float(np.mean(per_slice["corr_head"])),
        auroc_large_error=auroc(spread_in_head[sample], large[sample]),
        auroc_lesion=lesion_auc,
        auroc_faded_lesion=faded_auc,
    )


def _sample(size: int) -> np.ndarray:
    if size <= MAX_VOXELS:
        return np.arange(size)
    return np.sort(np.random.default_rng(0).choice(size, MAX_VOXELS, replace=False))


def summarize(results: list[SeriesResult]) -> dict[str, Any]:
    """Per direction and method: Spearman over series and the mean per-voxel AUROCs."""
    groups: dict[tuple[str, str], list[SeriesResult]] = {}
    for result in results:
        groups.setdefault((result.direction, result.method), []).append(result)
    summary = {}
    for (direction, method), items in sorted(groups.items()):
        uncertainty = [r.uncertainty for r in items]

        def spearman(values: list[float], items=items, uncertainty=uncertainty) -> float | None:
            if len(items) < 3:
                return None
            return float(stats.spearmanr(uncertainty, values).statistic)

        def mean(name: str, items=items) -> float | None:
            values = [getattr(r, name) for r in items if getattr(r, name) is not None]
            return float(np.mean(values)) if values else None

        summary[f"{direction} {method}"] = {
            "series": len(items),
            "spearman_uncertainty_mae": spearman([r.mae for r in items]),
            "spearman_uncertainty_1_minus_corr": spearman([r.one_minus_correlation for r in items]),
            "auroc_large_error_mean": mean("auroc_large_error"),
            "auroc_lesion_mean": mean("auroc_lesion"),
            "auroc_faded_lesion_mean": mean("auroc_faded_lesion"),
            "series_with_lesion_masks": sum(r.auroc_lesion is not None for r in items),
        }
    return summary


def kfold_runs(
    kfold: Path, configs: list[str], directions: list[str]
) -> list[tuple[str, list[Path], set[str]]]:
    """(label, model files, held-out patients) per direction, config and fold found: one
    file per seed of the fold (several make an ensemble too)."""
    folds = json.loads((kfold / "folds.json").read_text())
    runs = []
    for direction in directions:
        direction_folder = kfold / "models" / direction
        for config in configs:
            by_fold: dict[str, list[Path]] = {}
            for path in sorted((direction_folder / config).glob("seed-*/fold-*.pt")):
                by_fold.setdefault(path.stem, []).append(path)
            for fold, paths in sorted(by_fold.items()):
                if fold in folds:
                    label = f"{direction_folder.name}/{config}/{fold}"
                    runs.append((label, paths, set(folds[fold])))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.uncertainty", description=__doc__)
    parser.add_argument("data", type=Path, nargs="+", help="folders of paired studies")
    parser.add_argument("--kfold", type=Path, help="train.ablation's OUT (models, folds.json)")
    parser.add_argument("--configs", nargs="+", default=["v5"], help="with --kfold")
    directions = [direction.value for direction in Direction]
    parser.add_argument(
        "--directions", nargs="+", default=directions, choices=directions, help="with --kfold"
    )
    parser.add_argument("--model", type=Path, action="append", default=[], help="held-out model")
    parser.add_argument("--lesions", type=Path, nargs="*", default=[], help="lesion mask folders")
    parser.add_argument("--passes", type=int, default=2, help="MC dropout passes (node default)")
    parser.add_argument("--ensemble", action="store_true", help="also the seeds as an ensemble")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("var/uncertainty.json"))
    args = parser.parse_args(argv)
    use_threads(args.threads)
    if bool(args.kfold) == bool(args.model):
        parser.error("give --kfold DIR or --model FILE (not both)")
    lesions = LesionMasks.load(*args.lesions) if args.lesions else None
    pairs = find_pairs(args.data).pairs
    if args.kfold:
        runs = kfold_runs(args.kfold, args.configs, args.directions)
    else:
        runs = [(" + ".join(map(str, args.model)), args.model, {p.patient for p in pairs})]
    if not runs:
        print("no models found", file=sys.stderr)
        return 1
    results = []
    loaded: dict[tuple[str, str], PairedVolume] = {}
    for label, paths, held_out in runs:
        models = [load_model(path) for path in paths]
        direction = models[0].card.direction
        for pair in (p for p in pairs if p.patient in held_out):
            item = _paired(loaded, pair, direction, models[0], lesions)
            if item is None:
                continue
            methods = [[model] for model in models]
            if args.ensemble and len(models) > 1:
                methods.append(models)
            for chosen in methods:
                result = measure(item, chosen, args.passes, label)
                results.append(result)
                print(json.dumps(asdict(result)), file=sys.stderr, flush=True)
    report = {
        "runs": [label for label, _, _ in runs],
        "summary": summarize(results),
        "series": [asdict(r) for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"], indent=1))
    return 0


def _paired(
    loaded: dict[tuple[str, str], PairedVolume],
    pair: StudyPair,
    direction: str,
    model: LoadedModel,
    lesions: LesionMasks | None,
) -> PairedVolume | None:
    key = (pair.label, direction)
    if key not in loaded:
        item = load_pair(
            pair, direction, pixel_spacing_mm=model.card.pixel_spacing_mm, lesions=lesions
        )
        loaded[key] = item
    item = loaded[key]
    return item if len(item.slices) else None


if __name__ == "__main__":
    sys.exit(main())
