"""The token loop's KV cache: one left-padded ``DynamicCache`` whose rows join and leave between decoding steps.

Layout: every row's positions are right-aligned in one width W (b, W); a row shorter than W is padded on the left
and its padding is masked out by the (b, W) attention mask. A sliding-window layer stores only the last columns of
that width, right-aligned the same way, and counts W as its length.

- Joining rows (prefilled in a cache of their own) pads the narrower of the two caches on the left to the wider
  one's width, layer by layer, and concatenates the rows: one copy of the cache per join.
- Leaving rows are dropped from every layer (``batch_select_indices``); columns that only the rows that left used
  are trimmed from the left, so the width follows the longest running row, not the longest ever seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad_left(t_bhLd: torch.Tensor, width: int) -> torch.Tensor:
    """``(b, h, L, d)`` padded with zeros on the left of L to ``width``."""
    return F.pad(t_bhLd, (0, 0, width - t_bhLd.shape[-2], 0)) if t_bhLd.shape[-2] < width else t_bhLd


def _layers(cache) -> list:
    return list(cache.layers)


def join(cache, mask_bW: torch.Tensor, new_cache, new_mask_nW: torch.Tensor) -> torch.Tensor:
    """Append the rows of ``new_cache`` to ``cache`` (in place); returns the joined attention mask ``(b + n, W')``."""
    width = max(mask_bW.shape[1], new_mask_nW.shape[1])
    for layer, new in zip(_layers(cache), _layers(new_cache), strict=True):
        if not new.is_initialized:
            continue
        if not layer.is_initialized:  # a layer this cache never ran (none today); take the new rows' shape
            layer.lazy_initialization(new.keys, new.values)
        stored = max(layer.keys.shape[-2], new.keys.shape[-2])
        for name in ("keys", "values"):
            setattr(layer, name, torch.cat([_pad_left(getattr(layer, name), stored),
                                            _pad_left(getattr(new, name), stored)]))  # fmt: skip
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = width
    return torch.cat(
        [F.pad(mask_bW, (width - mask_bW.shape[1], 0)), F.pad(new_mask_nW, (width - new_mask_nW.shape[1], 0))]
    )


def select(cache, mask_bW: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keep only ``rows`` of the cache (in place) and trim the columns no kept row uses; returns the new mask."""
    cache.batch_select_indices(rows)
    mask_bW = mask_bW[rows]
    unused = int(mask_bW.any(dim=0).long().argmax())  # leading columns that every kept row pads
    if unused == 0:
        return mask_bW
    width = mask_bW.shape[1] - unused
    for layer in _layers(cache):
        if not layer.is_initialized:
            continue
        keep = min(layer.keys.shape[-2], width)
        layer.keys, layer.values = layer.keys[..., -keep:, :], layer.values[..., -keep:, :]
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = width
    return mask_bW[:, unused:]
