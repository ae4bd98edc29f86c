"""Monte-Carlo dropout on the CPU, with masks cut from a pool of random draws.

Drawing a random number per activation costs the CPU more than the narrow network's
convolution of that activation: measured on the development machine (2 cores), Bernoulli
masks for a 224x256 slice's 8 first-level maps took 2.1 ms, a 3x3 convolution of them
0.35 ms, so per-element dropout made a dropout pass 5-10 times a plain one. Here the masks
(0, or 1 / (1 - p) for the activations kept) are drawn once into a pool and every dropout
call takes a window of it at a random offset: within a mask each activation is still kept
with probability 1 - p independently of its neighbours; masks of different calls are
shifted windows of one random sequence, which for a spread over a few passes serves as
fresh draws do. On a GPU random draws are cheap and the network's own dropout runs.
"""

from __future__ import annotations

import torch
from torch import nn

# Pool size: at least this many values, and twice the largest activation seen.
MIN_POOL = 2**22


class MaskPool:
    """The masks of one dropout probability; sampling only while ``sampling``."""

    def __init__(self, p: float) -> None:
        self.p = p
        self.sampling = False
        self._values = torch.empty(0)
        self._offsets = torch.Generator().manual_seed(0)

    def restart(self, seed: int = 0) -> None:
        """The same offsets again from here: a spread that can be reproduced."""
        self._offsets.manual_seed(seed)

    def mask(self, like: torch.Tensor) -> torch.Tensor:
        """A mask shaped like ``like`` (N, C, H, W), laid out channels-last as it is."""
        count = like.numel()
        if self._values.numel() < 2 * count:
            draws = torch.Generator().manual_seed(1)
            size = max(MIN_POOL, 4 * count)
            keep = torch.rand(size, generator=draws) >= self.p
            self._values = keep.float() / (1.0 - self.p)
        start = int(
            torch.randint(0, self._values.numel() - count + 1, (1,), generator=self._offsets)
        )
        batch, channels, height, width = like.shape
        window = self._values[start : start + count].view(batch, height, width, channels)
        return window.permute(0, 3, 1, 2)


class PooledDropout(nn.Module):
    """nn.Dropout's place in an inference network: the identity unless its pool samples."""

    def __init__(self, pool: MaskPool) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pool.mask(x) if self.pool.sampling else x


def pool_dropouts(network: nn.Module) -> list[MaskPool]:
    """Replace, in place, every nn.Dropout of ``network`` by a PooledDropout (one pool per
    probability); return the pools."""
    pools: dict[float, MaskPool] = {}
    for module in network.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.Dropout) and child.p > 0:
                pool = pools.setdefault(child.p, MaskPool(child.p))
                setattr(module, name, PooledDropout(pool))
    return list(pools.values())
