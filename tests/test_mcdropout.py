"""Monte-Carlo dropout masks from a pool: the right fraction kept, scaled, laid out as the
activations, reproducible, and the identity when not sampling."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.mcdropout import MaskPool, PooledDropout, pool_dropouts


def test_masks_keep_one_minus_p_scaled_in_the_activations_layout():
    pool = MaskPool(0.1)
    x = torch.ones(2, 8, 64, 48).contiguous(memory_format=torch.channels_last)
    mask = pool.mask(x)
    assert mask.shape == x.shape and mask.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(mask.unique(), torch.tensor([0.0, 1 / 0.9]))
    assert abs((mask > 0).float().mean().item() - 0.9) < 0.01
    assert not torch.equal(mask, pool.mask(x))  # another window
    pool.restart()
    first = pool.mask(x)
    pool.restart()
    assert torch.equal(first, pool.mask(x))  # reproducible


def test_pooled_dropout_replaces_dropout_and_samples_only_when_asked():
    network = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.2), nn.Sequential(nn.Dropout(0.2)))
    (pool,) = pool_dropouts(network)
    assert isinstance(network[1], PooledDropout) and isinstance(network[2][0], PooledDropout)
    x = torch.ones(1, 4, 8, 8)
    assert torch.equal(network[1](x), x)
    pool.sampling = True
    assert (network[1](x) == 0).any()
