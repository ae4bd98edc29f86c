"""A word burnt into the pixels of a derived image, in the air outside the head.

The header marks a synthetic series (ImageType, SeriesDescription, Synthetic Data), but a
screenshot, a print or a viewer that hides the description shows pixels only. A small
label in a corner of the air says it there too. It goes where the head is not, nearest a
corner; an image with no room for it outside the head gets it where it covers the least.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 5x7 glyphs of the letters the node writes ("SYNTHETIC", "UNCERTAINTY").
_GLYPHS = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "N": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".###.", "#...#", "#....", ".###.", "....#", "#...#", ".###."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
}
# Pixels per glyph dot for each this many pixels of the image's shorter side: 7 dots tall
# on a 256 matrix, 14 on a 512 one.
_PIXELS_PER_SCALE = 192
# Head pixels this far from the label still count as too close (a margin of air).
_MARGIN = 3


def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """The bitmap (bool, 7*scale x (6*len-1)*scale) of ``text`` in capitals."""
    try:
        glyphs = [_GLYPHS[letter] for letter in text.upper()]
    except KeyError as error:
        raise ValueError(f"no glyph for {error.args[0]!r}") from None
    rows = [" ".join(glyph[row] for glyph in glyphs).replace(" ", ".") for row in range(7)]
    bitmap = np.array([[dot == "#" for dot in row] for row in rows])
    return np.kron(bitmap, np.ones((scale, scale), dtype=bool))


def _scale(image_shape: tuple[int, ...]) -> int:
    return max(1, min(image_shape) // _PIXELS_PER_SCALE)


def _box(text: str, scale: int) -> tuple[int, int]:
    """The label's size with its dark border of one dot."""
    return 7 * scale + 2 * scale, (6 * len(text) - 1) * scale + 2 * scale


def label_fits(image_shape: tuple[int, int], text: str) -> bool:
    """Whether an image of ``image_shape`` (rows, columns) has room for ``text``; no MR
    matrix lacks it, only test images of a few pixels."""
    box = _box(text, _scale(image_shape))
    return box[0] <= image_shape[0] and box[1] <= image_shape[1]


def burn_label(pixels: np.ndarray, head: np.ndarray, text: str, value: int) -> np.ndarray:
    """``pixels`` (S, H, W) with ``text`` written as ``value`` into every slice, where its
    ``head`` mask (same shape, bool) is not; a new array."""
    if pixels.shape != head.shape or pixels.ndim != 3:
        raise ValueError(f"pixels {pixels.shape} and head mask {head.shape} differ")
    scale = _scale(pixels.shape[1:])
    bitmap = text_mask(text, scale)
    box = _box(text, scale)
    if not label_fits(pixels.shape[1:], text):
        raise ValueError(f"a {pixels.shape[1]}x{pixels.shape[2]} image is too small for {text!r}")
    out = pixels.copy()
    for index in range(out.shape[0]):
        row, column = _place(head[index], box, margin=_MARGIN * scale)
        patch = out[index, row : row + box[0], column : column + box[1]]
        patch[...] = 0  # a dark box, so the letters read on whatever is under them
        patch[scale : scale + bitmap.shape[0], scale : scale + bitmap.shape[1]][bitmap] = value
    return out


def _place(head: np.ndarray, box: tuple[int, int], margin: int) -> tuple[int, int]:
    """The top-left corner of a ``box`` over the fewest head pixels (none, where there is
    room), nearest a corner of the image."""
    near = ndimage.binary_dilation(head, iterations=margin) if head.any() else head
    # covered[r, c]: head pixels under the box whose top-left corner is (r, c).
    summed = np.pad(near.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    height, width = box
    covered = (
        summed[height:, width:]
        - summed[:-height, width:]
        - summed[height:, :-width]
        + summed[:-height, :-width]
    )
    rows, columns = np.indices(covered.shape)
    last_row, last_column = covered.shape[0] - 1, covered.shape[1] - 1
    from_corner = np.minimum(rows, last_row - rows) + np.minimum(columns, last_column - columns)
    # Fewest head pixels first, then nearest a corner; ties go to the top-left.
    order = np.lexsort((from_corner.ravel(), covered.ravel()))
    return np.unravel_index(order[0], covered.shape)
