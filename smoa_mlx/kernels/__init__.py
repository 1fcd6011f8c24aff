"""Dispatch for the SMoA block-modulated product.

Every backend exposes the same callable ``fn(x, index, weight_parts, a_list, b_list) -> delta_y`` for a
:class:`BlockLayout`. ``SMOA_MLX_KERNEL=mlx`` forces the pure-MLX reference path.
"""

from __future__ import annotations

import os

from .reference import BlockLayout, dense_delta, gather_anchor, gather_rows, reference_delta_fn

__all__ = ["BlockLayout", "delta_fn", "dense_delta", "gather_anchor", "gather_rows", "reference_delta_fn"]

KERNEL_ENV = "SMOA_MLX_KERNEL"


def delta_fn(layout: BlockLayout):
    """The fastest available implementation of the update for ``layout``."""
    if os.environ.get(KERNEL_ENV, "auto").lower() in ("mlx", "reference", "off", "0"):
        return reference_delta_fn(layout)
    return reference_delta_fn(layout)
