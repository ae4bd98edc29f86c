"""Lesions painted into training pairs, so the network learns to carry an abnormality through.

A network trained on a handful of patients has seen few lesions. Shown a glioma's oedema,
which is only a little darker than white matter on T1 but far brighter on T2, it paints
normal tissue: the lesion vanishes from the synthetic T2. So crops get lesions painted
into both images of the pair, following what most brain lesions are made of: more water.
A lesion is modelled as a fraction ``g`` of each voxel turned into fluid, in both images:

    painted = (1 - g) * tissue + g * fluid

with the fluid's own level in each image (dark on T1, bright on T2). The T1 takes only a
share of the fraction (oedema and demyelination shorten T1 less than they lengthen T2), so
the network learns that a faint darkening on T1 can be a bright lesion on T2. Shapes are
ellipsoids with irregular borders, soft edges and texture, single and large (tumour and
oedema, sometimes with a fluid core) or several and small (MS plaques); they are 3-D, so
the neighbouring slices a 2.5-D model sees show the same lesion at their depth.

Everything draws from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# The fluid's level: on T2 a high percentile of the head (CSF, and the scalp's fat on a
# study with a skull); on T1 the median of the voxels deep in the head that are that
# bright on T2, which are the ventricles' CSF. The head's darkest T1 voxels would be bone
# and air, darker than any lesion, and its rim mixes CSF with the scalp's fat.
T2_FLUID_PERCENTILE = 99.0
T2_BRIGHT_PERCENTILE = 98.0
DEEP = 10  # pixels inside the head's outline
# Lesions lie in the brain, not in the scalp: their centres keep this far (pixels, about
# mm) inside the head, and the fluid they add this far.
CENTRE_DEPTH = 8
EXTENT_DEPTH = 4
# Borders wobble over at least this many pixels: finer wobble breaks a small lesion into
# specks.
MIN_WOBBLE_PIXELS = 4.0


@dataclass(frozen=True)
class FluidLevels:
    """The level of fluid in the normalised source and target of one study."""

    source: float
    target: float


@dataclass(frozen=True)
class PaintSettings:
    single_probability: float = 0.6  # one large lesion; else several small ones
    large_radius_mm: tuple[float, float] = (4.0, 25.0)
    small_radius_mm: tuple[float, float] = (1.5, 6.0)
    small_count: tuple[int, int] = (2, 5)
    fraction: tuple[float, float] = (0.25, 0.95)  # largest fluid fraction of a lesion
    t1_share: tuple[float, float] = (0.25, 1.0)  # of the fraction that shows on T1
    core_probability: float = 0.3  # a large lesion with a fluid (necrotic, cystic) core
    irregularity: float = 0.3  # relative wobble of the border
    texture: float = 0.2  # relative variation of the fraction inside


def fluid_levels(
    source: np.ndarray, target: np.ndarray, head: np.ndarray, source_is_t1: bool
) -> FluidLevels:
    """Fluid's level in a study's normalised source and target, from their head voxels."""
    t1, t2 = (source, target) if source_is_t1 else (target, source)
    t2_level = float(np.percentile(t2[head], T2_FLUID_PERCENTILE))
    deep = np.stack([ndimage.binary_erosion(image, iterations=DEEP) for image in head])
    if not deep.any():
        deep = head
    bright = t2 >= np.percentile(t2[deep], T2_BRIGHT_PERCENTILE)
    t1_level = float(np.median(t1[deep & bright]))
    return FluidLevels(*((t1_level, t2_level) if source_is_t1 else (t2_level, t1_level)))


def paint_lesions(
    source: np.ndarray,
    target: np.ndarray,
    head: np.ndarray,
    levels: FluidLevels,
    source_is_t1: bool,
    depths_mm: tuple[float, ...],
    pixel_mm: float,
    rng: np.random.Generator,
    settings: PaintSettings | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint lesions into a crop pair: ``source`` (C, h, w), whose channel c lies
    ``depths_mm[c]`` from the target's slice, ``target`` (h, w), inside ``head`` (h, w).

    Returns the painted source and target and the fluid fraction painted into the target
    (h, w; 0 where nothing was). Without head pixels the crop is returned as it is.
    """
    settings = settings or PaintSettings()
    rows, columns = np.nonzero(ndimage.binary_erosion(head, iterations=CENTRE_DEPTH))
    if not rows.size:
        return source, target, np.zeros_like(target)
    inside = ndimage.binary_erosion(head, iterations=EXTENT_DEPTH)
    shape = target.shape
    depths = np.asarray(depths_mm, dtype=np.float32)
    fraction = np.zeros((len(depths), *shape), dtype=np.float32)
    share = np.ones_like(fraction)
    if rng.random() < settings.single_probability:
        count, radii = 1, settings.large_radius_mm
    else:
        count, radii = (
            int(rng.integers(*settings.small_count, endpoint=True)),
            (settings.small_radius_mm),
        )
    for _ in range(count):
        pick = rng.integers(rows.size)
        centre = (rows[pick], columns[pick], rng.uniform(-0.5, 0.5))
        radius = math.exp(rng.uniform(math.log(radii[0]), math.log(radii[1])))
        lesion, lesion_share = _lesion(shape, depths, centre, radius, pixel_mm, settings, rng)
        stronger = lesion > fraction
        fraction = np.where(stronger, lesion, fraction)
        share = np.where(stronger, lesion_share, share)
    fraction *= inside
    t1_fraction, t2_fraction = fraction * share, fraction
    source_fraction, target_fraction = (
        (t1_fraction, t2_fraction) if source_is_t1 else (t2_fraction, t1_fraction)
    )
    painted_source = (1 - source_fraction) * source + source_fraction * levels.source
    centre_slice = int(np.argmin(np.abs(depths)))
    painted_fraction = target_fraction[centre_slice]
    painted_target = (1 - painted_fraction) * target + painted_fraction * levels.target
    return (
        painted_source.astype(np.float32),
        painted_target.astype(np.float32),
        fraction[centre_slice],
    )


def _lesion(
    shape: tuple[int, ...],
    depths: np.ndarray,
    centre: tuple[float, float, float],
    radius_mm: float,
    pixel_mm: float,
    settings: PaintSettings,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(fluid fraction, its share on T1), each (C, h, w), of one lesion."""
    axes = radius_mm * (1 + rng.uniform(-0.35, 0.35, size=3))
    angle = rng.uniform(0, math.pi)
    rows, columns = np.meshgrid(
        (np.arange(shape[0]) - centre[0]) * pixel_mm,
        (np.arange(shape[1]) - centre[1]) * pixel_mm,
        indexing="ij",
    )
    along = math.cos(angle) * rows + math.sin(angle) * columns
    across = -math.sin(angle) * rows + math.cos(angle) * columns
    depth = depths[:, None, None] - centre[2] * axes[2]
    radial = np.sqrt((along / axes[0]) ** 2 + (across / axes[1]) ** 2 + (depth / axes[2]) ** 2)
    wobble = _smooth_noise(shape, max(radius_mm / pixel_mm, MIN_WOBBLE_PIXELS), rng)
    radial = radial * (1 + settings.irregularity * wobble)
    softness = rng.uniform(0.1, 0.5)
    profile = np.clip((1 - radial) / softness, 0.0, 1.0)
    peak = rng.uniform(*settings.fraction)
    texture = 1 + settings.texture * _smooth_noise(shape, 2.0, rng)
    fraction = np.clip(peak * profile * texture, 0.0, 1.0)
    share = np.full_like(fraction, rng.uniform(*settings.t1_share))
    if radius_mm > settings.small_radius_mm[1] and rng.random() < settings.core_probability:
        core = radial < rng.uniform(0.25, 0.5)
        fraction = np.where(core, rng.uniform(0.85, 1.0), fraction)
        share = np.where(core, 1.0, share)
    return fraction.astype(np.float32), share.astype(np.float32)


def _smooth_noise(shape: tuple[int, ...], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Noise of about unit amplitude that varies over ``scale`` pixels, (h, w)."""
    noise = ndimage.gaussian_filter(rng.normal(size=shape), max(scale / 2, 1.0), mode="wrap")
    spread = noise.std()
    return (noise / spread if spread > 0 else noise).astype(np.float32)
