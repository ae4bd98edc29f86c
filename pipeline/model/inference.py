"""Running a loaded model over a volume, on the GPU when torch sees one, else on the CPU.

The same code serves both: the device only changes where tensors live and how many slices go
through the network at once.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.dicom.reformat import resize_slices, working_shape
from pipeline.model.card import LoadedModel, describe, load_model
from pipeline.model.mcdropout import pool_dropouts
from pipeline.model.preprocess import head_mask, model_input, neighbour_slices, normalize_volume

log = logging.getLogger(__name__)

# CPU batches: the first level's feature maps of one batch should stay within about this
# many bytes, so that a convolution's output is still in cache when the next one reads it.
# Measured on a 2-core EPYC (1 MiB L2 a core, 32 MiB L3) with 256x256 slices and base width
# 16 (4 MiB a map): a batch of 1 ran fastest, 2 to 4 up to 15% slower, 8 and more 20-30%
# slower. oneDNN splits each convolution across all cores, so one slice keeps them busy.
CPU_BATCH_BYTES = 4 * 2**20

# GPU batches: bytes of activations per pixel and first-level channel that one slice needs
# at its peak. The skips of all levels add up to about 2 first-level maps and the top
# decoder level holds about 4 more at once; 16 leaves room for cuDNN's workspaces.
GPU_BYTES_PER_PIXEL_CHANNEL = 16 * 4
# Fraction of the GPU's free memory a batch may take: other processes may share the GPU.
GPU_MEMORY_SHARE = 0.5


def pick_device() -> torch.device:
    """The first CUDA device if torch sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def why_no_cuda() -> str | None:
    """Why a worker configured for CUDA could not use it here, or None when it can."""
    if torch.cuda.is_available():
        return None
    return f"torch {torch.__version__} sees no CUDA device"


def use_threads(count: int) -> None:
    """Let torch use ``count`` CPU threads, e.g. one each for two trainings on two cores."""
    torch.set_num_threads(count)


def slices_per_batch(device: torch.device, height: int, width: int, base_width: int) -> int:
    """How many slices of ``height`` x ``width`` to run at once on ``device``."""
    first_level_map = base_width * height * width
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_MEMORY_SHARE)
        return max(1, budget // (first_level_map * GPU_BYTES_PER_PIXEL_CHANNEL))
    return max(1, CPU_BATCH_BYTES // (first_level_map * 4))


def fold_batch_norms(network: nn.Module) -> nn.Module:
    """Fold, in place, every eval-mode batch norm into the convolution before it.

    In eval mode a batch norm is a fixed affine map: folded, it costs nothing, where it
    would otherwise be a separate pass over every feature map.
    """
    for module in network.modules():
        if isinstance(module, nn.Sequential):
            for index in range(len(module) - 1):
                conv, norm = module[index], module[index + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module[index] = fuse_conv_bn_eval(conv, norm)
                    module[index + 1] = nn.Identity()
    return network


class Synthesizer:
    """Synthesizes a volume of the target contrast with a loaded model, on its device."""

    def __init__(self, model: LoadedModel) -> None:
        self.card = model.card
        self.device = next(model.network.parameters()).device
        self._base_width = model.network.base_width
        # A copy, so the LoadedModel's network stays as the file describes it. Channels-last
        # lets oneDNN and cuDNN run their fastest convolutions without reordering every map:
        # 1.4x on the CPU, measured.
        network = fold_batch_norms(copy.deepcopy(model.network).eval())
        self._network = network.to(memory_format=torch.channels_last)
        # On the CPU random draws cost more than the convolutions (pipeline.model.mcdropout).
        self._pools = pool_dropouts(self._network) if self.device.type == "cpu" else []

    def synthesize(
        self,
        volume: np.ndarray,
        pixel_spacing: Sequence[float],
        slice_offsets: Sequence[float] | None = None,
    ) -> np.ndarray:
        """Network output (S, H, W) float32, in the target's normalised space, for a volume.

        ``volume`` is the rescaled float32 source series (slices, rows, columns) and
        ``pixel_spacing`` its (between rows, between columns) in mm: slices whose pixels are
        far from the size the model learnt go through the network resampled to it
        (``pipeline.dicom.reformat``), and the output comes back on the volume's grid.
        ``slice_offsets`` are the slices' positions along the normal (mm, ascending), which
        a model that sees neighbouring slices needs.
        Outside the source's head the output is 0: air is dark in every MR contrast, and a
        network shown background it never learnt from (the orbits' fat of a native scan,
        say, beside skull-stripped training data) can paint it grey or with a pattern.
        Raises ValueError for a volume that cannot be normalised (not 3-D, no contrast), or
        without ``slice_offsets`` for a model that needs them.
        """
        return self.synthesize_with_spread(volume, pixel_spacing, slice_offsets, passes=0)[0]

    def synthesize_with_spread(
        self,
        volume: np.ndarray,
        pixel_spacing: Sequence[float],
        slice_offsets: Sequence[float] | None,
        passes: int,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``synthesize``'s output, and with ``passes`` > 0 its Monte-Carlo dropout spread:
        per voxel, the standard deviation of the plain output and ``passes`` outputs with
        the network's dropout on (Gal and Ghahramani 2016), in the same space, 0 outside
        the head (None without passes). Costs 1 + ``passes`` plain syntheses. Seeded: the
        same input gives the same spread."""
        shape = working_shape(volume.shape, pixel_spacing, self.card.pixel_spacing_mm)
        seen = volume if shape is None else resize_slices(volume, shape)
        normalized = normalize_volume(seen, self.card.normalization)
        neighbours = None
        if self.card.neighbour_distance_mm:
            if slice_offsets is None:
                raise ValueError(
                    f"model {self.card.name} {self.card.version} sees neighbouring slices and "
                    "needs the slices' positions"
                )
            neighbours = neighbour_slices(
                normalized, np.asarray(slice_offsets), self.card.neighbour_distance_mm
            )
        inputs = torch.from_numpy(model_input(normalized, self.card.gradient_channels, neighbours))
        outputs = [self._forward(inputs)]
        if passes:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), self._dropout_on():
                torch.manual_seed(0)
                outputs += [self._forward(inputs) for _ in range(passes)]
        head = head_mask(volume)

        def on_volume_grid(output: np.ndarray) -> np.ndarray:
            if shape is not None:
                output = resize_slices(output, volume.shape[1:])
            output[~head] = 0.0
            return output

        spread = np.std(np.stack(outputs), axis=0) if passes else None
        return on_volume_grid(outputs[0]), None if spread is None else on_volume_grid(spread)

    @contextmanager
    def _dropout_on(self) -> Iterator[None]:
        """The network's dropout sampling, nothing else: batch norms are folded into their
        convolutions and stay as they are. Seeded: the same input gives the same spread."""
        dropouts = [m for m in self._network.modules() if isinstance(m, nn.Dropout)]
        for module in dropouts:
            module.train()
        for pool in self._pools:
            pool.restart()
            pool.sampling = True
        try:
            yield
        finally:
            for module in dropouts:
                module.eval()
            for pool in self._pools:
                pool.sampling = False

    def _forward(self, inputs: torch.Tensor) -> np.ndarray:
        slices, _, height, width = inputs.shape
        batch = slices_per_batch(self.device, height, width, self._base_width)
        output = np.empty((slices, height, width), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, slices, batch):
                chunk = inputs[start : start + batch].to(self.device)
                result = self._network(chunk.contiguous(memory_format=torch.channels_last))
                output[start : start + batch] = result[:, 0].float().cpu().numpy()
        return output


class Synthesizers:
    """Models by file, each loaded once on ``device``. Loading one version of a model drops
    the others of its folder (its registry name): a newly activated version replaces the
    one before, while a job in flight keeps the Synthesizer it holds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._loaded: dict[Path, Synthesizer] = {}

    def get(self, path: Path) -> Synthesizer:
        """The model at ``path``; raises ModelFileError for a file that cannot be used."""
        if path not in self._loaded:
            loaded = load_model(path, self.device)
            others = {p: s for p, s in self._loaded.items() if p.parent != path.parent}
            self._loaded = {path: Synthesizer(loaded)} | others
            log.info("model %s loaded from %s on %s", describe(loaded.card), path, self.device)
        return self._loaded[path]
