"""The training loop: seeded, checkpointed every epoch, resumable, on the GPU when present.

Every random draw comes from one numpy Generator and torch's generator, both seeded from
``TrainSettings.seed`` and saved in the checkpoint, so a CPU run and a resumed run give the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import io
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.choices import Choice
from pipeline.dicom.contrast import Direction
from pipeline.files import write_atomically
from pipeline.model.inference import pick_device
from pipeline.model.preprocess import Normalization, input_channels, normalized_ceiling
from pipeline.model.scores import (
    SSIM_C1,
    SSIM_C2,
    SSIM_SIGMA,
    mean_metrics,
    minmax_slices,
    slice_metrics,
)
from pipeline.model.unet import UNet, default_arguments
from train.augment import AugmentSettings
from train.dataset import TrainingStudy, network_input, sample_batch


class Loss(Choice):
    """What the training minimises: a pixel term, with or without (1 - SSIM) beside it."""

    MSE = "mse"
    L1 = "l1"
    MSE_SSIM = "mse+ssim"
    L1_SSIM = "l1+ssim"


class Precision(Choice):
    """The number format of the network's convolutions in training. The weights, the loss
    and the optimiser stay float32 either way, and inference is float32."""

    FLOAT32 = "float32"
    # torch.autocast: about 1.5x the crops per second of float32 for the shipped recipe on
    # a CPU with AVX-512 BF16 (bench/training), more on a GPU's tensor cores. Whether its
    # models score as well held out is docs/ablation.md's to show before a recipe uses it.
    BFLOAT16 = "bfloat16"


# Weight of (1 - SSIM) beside the MSE in "mse+ssim": SSIM's gradient is about 10x the
# MSE's on [0, 1] images, so equal weights would let it swamp the intensity term. The
# same weight serves "l1+ssim".
SSIM_LOSS_WEIGHT = 0.1
# Slices per held-out study that the epoch's validation line is computed on: enough for a
# trend, cheap enough to run every epoch on a CPU. The final evaluation uses them all.
VALIDATION_SLICES = 12


SHIPPED_NEIGHBOUR_MM = 3.0


def shipped_arguments() -> dict[str, Any]:
    """The shipped network's arguments: the U-Net's defaults, with the input channels of
    the slice, its Sobel gradients and its two neighbours."""
    return default_arguments() | {"in_channels": input_channels(True, neighbours=True)}


@dataclass(frozen=True)
class TrainSettings:
    direction: Direction
    # The defaults are the v5 recipe; the shipped models are it with `--base-width 16`
    # (t2-to-t1 v6), and t1-to-t2 v7 also with `--lesion-painting 1 --painted-tumour-share 0`;
    # docs/ablation.md has the held-out numbers that chose it. The input is median-scaled,
    # so a brain lands at one level with or without its skull; the targets stay in
    # percentile-volume's space; the network sees the slices 3 mm below and above; lesions
    # are painted in, thin-slice studies shown as slabs, masked lesions oversampled, for
    # 24 x 150 steps.
    normalization: Normalization = Normalization.MEDIAN_VOLUME
    # The targets' normalisation, i.e. the output's space; None: the same as the input's.
    target_normalization: Normalization | None = Normalization.PERCENTILE_VOLUME
    # In-plane pixel size (mm) the slices are resampled to where theirs is far from it
    # (pipeline.dicom.reformat): the training data's own, about 1 mm.
    pixel_spacing_mm: float = 1.0
    # The network also sees the slices this far (mm) below and above; None: 2-D.
    neighbour_distance_mm: float | None = SHIPPED_NEIGHBOUR_MM
    gradient_channels: bool = True  # the paper's Sobel channels beside the slice
    # The U-Net's arguments; in_channels must be ``input_channels``.
    arguments: dict[str, Any] = field(default_factory=lambda: shipped_arguments())
    epochs: int = 24
    steps_per_epoch: int = 150
    batch_size: int = 16
    crop: int = 96
    learning_rate: float = 1e-3
    loss: Loss = Loss.MSE_SSIM
    precision: Precision = Precision.FLOAT32
    augment: bool = True
    # With augmentation: the probability that a crop gets lesions painted in
    # (train.lesionpaint), and the extra weight of painted pixels in the loss.
    lesion_painting: float = 0.5
    lesion_weight: float = 0.0
    # Weight of a gradient-difference term (the mean absolute difference between the
    # output's and the target's neighbour-to-neighbour steps): a squared error is smallest
    # for a blurred edge, this term for a sharp one, and a lesion's edge is what shows it.
    edge_weight: float = 0.0
    # The share of a painted lesion's fluid fraction that shows on T1 (uniform between
    # the two): a lesion is usually far fainter on T1 than on T2.
    painted_t1_share: tuple[float, float] = (0.25, 1.0)
    # The share of paintings that are one large lesion (a tumour with its oedema); the
    # others are several small ones (MS plaques).
    painted_tumour_share: float = 0.6
    # The probability that a crop is centred on a voxel of an expert's lesion mask, where
    # the study has one.
    lesion_oversampling: float = 0.2
    # With augmentation: the probability that a thin-slice study is shown as thick slabs.
    thick_slices: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        # Settings that cannot train are refused before minutes go into loading data; the
        # choices, given as text by the command line and the ablation, become enums.
        choices = {
            "direction": Direction,
            "normalization": Normalization,
            "target_normalization": Normalization,
            "loss": Loss,
            "precision": Precision,
        }
        for name, kind in choices.items():
            if getattr(self, name) is not None:
                object.__setattr__(self, name, kind.parse(getattr(self, name), name))
        if not self.pixel_spacing_mm > 0:
            raise ValueError(f"pixel_spacing_mm must be positive, not {self.pixel_spacing_mm}")
        if self.neighbour_distance_mm is not None and not self.neighbour_distance_mm > 0:
            raise ValueError(
                f"neighbour_distance_mm must be positive (or None for 2-D), not "
                f"{self.neighbour_distance_mm}"
            )
        for name in (
            "lesion_painting",
            "painted_tumour_share",
            "lesion_oversampling",
            "thick_slices",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, not {getattr(self, name)}")
        low, high = self.painted_t1_share
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"painted_t1_share must be 0 <= low <= high <= 1, not {low, high}")
        for name in ("epochs", "steps_per_epoch", "batch_size", "crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, not {self.learning_rate}")
        for name in ("lesion_weight", "edge_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")
        given = (default_arguments() | self.arguments)["in_channels"]
        if given != self.input_channels:
            raise ValueError(
                f"in_channels {given} does not fit the input: {self.input_channels} channels "
                f"with gradient_channels={self.gradient_channels} and "
                f"neighbour_distance_mm={self.neighbour_distance_mm}"
            )
        UNet(**self.arguments)  # raises ValueError or TypeError for bad arguments

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainSettings:
        """The settings a model card records (``training.settings``: these, as JSON), to
        train that recipe again. ValueError when the record lacks a setting without a
        default, names one this version does not know, or holds one that cannot train."""
        unknown = sorted(set(record) - {setting.name for setting in fields(cls)})
        if unknown:
            raise ValueError(
                "the recipe names settings this version of dicomnode does not know: "
                + ", ".join(unknown)
            )
        values = dict(record)
        if "painted_t1_share" in values:
            values["painted_t1_share"] = tuple(values["painted_t1_share"])
        try:
            return cls(**values)
        except TypeError as error:
            raise ValueError(f"the recipe is incomplete or malformed: {error}") from None

    @property
    def output_normalization(self) -> Normalization:
        return self.target_normalization or self.normalization

    @property
    def input_channels(self) -> int:
        return input_channels(self.gradient_channels, self.neighbour_distance_mm is not None)

    def study_preparation(self) -> tuple[Any, ...]:
        """What ``train.dataset.prepare_study`` depends on: equal keys, equal studies."""
        return (
            self.direction,
            self.normalization,
            self.output_normalization,
            self.neighbour_distance_mm,
            self.thick_slices > 0,
        )


@dataclass
class TrainResult:
    network: UNet
    history: list[dict[str, float]]  # one entry per epoch: loss and validation metrics
    seconds: float  # wall time of the epochs run in this process
    samples: int  # crops seen in this process

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


Progress = Callable[[str, bool], None]  # (text, final line of an epoch?)


def console_progress(text: str, final: bool) -> None:
    """Progress on stderr: on a terminal one line rewritten in place, kept at the end of each
    epoch; in a log file only the epochs' lines."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + text + ("\n" if final else ""))
    elif final:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def train_network(
    studies: list[TrainingStudy],
    validation: list[TrainingStudy],
    settings: TrainSettings,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Train a U-Net on crops of ``studies``; report validation metrics each epoch.

    With ``checkpoint`` the state is written there after every epoch; with ``resume`` a
    run continues from it (the settings must be the same). Raises ValueError for no
    training data or a checkpoint of other settings.
    """
    if not studies:
        raise ValueError("no training pairs: every paired patient is held out")
    device = pick_device()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    # Channels-last lets oneDNN and cuDNN pick their fastest convolutions: 1.2x on the CPU.
    network = UNet(**settings.arguments).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
    total_steps = settings.epochs * settings.steps_per_epoch
    # Cosine decay to zero: short CPU runs end on small steps instead of mid-oscillation.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    history: list[dict[str, float]] = []
    first_epoch = 0
    if resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["settings"] != asdict(settings):
            raise ValueError(
                f"checkpoint {checkpoint} was written with other settings; "
                "run without --resume to start afresh"
            )
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        first_epoch = len(history)

    ceiling = normalized_ceiling(settings.normalization)
    augment = AugmentSettings(ceiling=ceiling) if settings.augment else None
    bfloat16 = settings.precision is Precision.BFLOAT16
    started, samples = time.perf_counter(), 0
    for epoch in range(first_epoch, settings.epochs):
        network.train()
        losses = []
        for step in range(settings.steps_per_epoch):
            inputs, targets, weights = (
                torch.from_numpy(array).to(device).contiguous(memory_format=torch.channels_last)
                for array in sample_batch(studies, settings, augment, rng)
            )
            with torch.autocast(device.type, torch.bfloat16, enabled=bfloat16):
                output = network(inputs)
            loss = _loss(output.float(), targets, weights, settings.loss, settings.edge_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            samples += settings.batch_size
            if progress is not None:
                bar = _bar(step + 1, settings.steps_per_epoch)
                progress(
                    f"epoch {epoch + 1}/{settings.epochs} {bar} loss {np.mean(losses):.5f}",
                    False,
                )
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
        record.update(validate(network, validation, settings.gradient_channels))
        history.append(record)
        if progress is not None:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch")
            progress(f"epoch {epoch + 1}/{settings.epochs} {shown}", True)
        if checkpoint is not None:
            _save_checkpoint(checkpoint, network, optimizer, schedule, rng, history, settings)
    return TrainResult(network.eval(), history, time.perf_counter() - started, samples)


def validate(
    network: UNet, studies: list[TrainingStudy], gradient_channels: bool
) -> dict[str, float]:
    """Paper metrics on a few whole slices of each held-out study, prefixed ``val_``."""
    if not studies:
        return {}
    device = next(network.parameters()).device
    network.eval()
    values: dict[str, list[float]] = {}
    with torch.inference_mode():
        for study in studies:
            picks = np.linspace(0, study.source.shape[0] - 1, VALIDATION_SLICES).round()
            picks = np.unique(picks.astype(int))
            inputs = torch.from_numpy(network_input(study.source[picks], gradient_channels))
            output = network(inputs.to(device))[:, 0].float().cpu().numpy()
            per_slice = slice_metrics(
                minmax_slices(output),
                minmax_slices(study.target[picks]),
                study.covered[picks],
                study.head[picks],
            )
            for key, items in per_slice.items():
                values.setdefault(key, []).extend(items)
    chosen = ("mse_slice", "psnr_slice", "psnr_head", "ssim_head")
    return {f"val_{k}": v for k, v in mean_metrics(values).items() if k in chosen}


def _loss(
    output: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    kind: Loss,
    edge_weight: float = 0.0,
) -> torch.Tensor:
    # Weighted means: pixels where a resampled target is undefined do not count.
    total = weight.sum().clamp_min(1.0)
    if kind in (Loss.L1, Loss.L1_SSIM):
        loss = ((output - target).abs() * weight).sum() / total
    else:
        loss = ((output - target) ** 2 * weight).sum() / total
    # SSIM and the edges see where the target is defined, not the painted weights.
    defined = (weight > 0).to(output.dtype)
    if kind in (Loss.MSE_SSIM, Loss.L1_SSIM):
        loss = loss + SSIM_LOSS_WEIGHT * (1 - _ssim(output * defined, target * defined))
    if edge_weight > 0:
        loss = loss + edge_weight * _edge_difference(output, target, defined)
    return loss


def _edge_difference(
    output: torch.Tensor, target: torch.Tensor, defined: torch.Tensor
) -> torch.Tensor:
    """Mean absolute difference of the steps between neighbouring pixels, along both
    in-plane axes, where both neighbours are defined (Mathieu et al.'s gradient
    difference loss with exponent 1)."""
    total, count = output.new_zeros(()), output.new_zeros(())
    for axis in (-1, -2):
        both = defined.narrow(axis, 1, defined.shape[axis] - 1) * defined.narrow(
            axis, 0, defined.shape[axis] - 1
        )
        steps = [image.diff(dim=axis).abs() for image in (output, target)]
        total = total + ((steps[0] - steps[1]).abs() * both).sum()
        count = count + both.sum()
    return total / count.clamp_min(1.0)


def _ssim(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Mean SSIM with the same window and constants as ``pipeline.model.scores.ssim_map``."""
    radius = 5
    x = torch.arange(-radius, radius + 1, dtype=first.dtype, device=first.device)
    kernel = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    kernel = kernel / kernel.sum()

    def blur(image: torch.Tensor) -> torch.Tensor:
        image = F.conv2d(image, kernel.view(1, 1, 1, -1), padding=(0, radius))
        return F.conv2d(image, kernel.view(1, 1, -1, 1), padding=(radius, 0))

    mean_a, mean_b = blur(first), blur(second)
    var_a = blur(first * first) - mean_a**2
    var_b = blur(second * second) - mean_b**2
    covariance = blur(first * second) - mean_a * mean_b
    ssim = ((2 * mean_a * mean_b + SSIM_C1) * (2 * covariance + SSIM_C2)) / (
        (mean_a**2 + mean_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    )
    return ssim.mean()


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _save_checkpoint(
    path: Path,
    network: UNet,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    history: list[dict[str, float]],
    settings: TrainSettings,
) -> None:
    buffer = io.BytesIO()
    torch.save(
        {
            "settings": asdict(settings),
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "history": history,
        },
        buffer,
    )
    write_atomically(path, buffer.getvalue())
