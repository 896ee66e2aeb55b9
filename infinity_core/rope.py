"""2-D rotary position embedding of Infinity (`rope2d_normalized_by_hw=2`).

Every token of a scale `(h, w)` gets the grid position it would have on the final grid of the
template's 1M schedule (U_h x U_w): row `round(y * U_h / h)`, column `round(x * U_w / w)`,
products in float32 and round-half-to-even, as the official code. Positions are the same at every
tier, so a 0.06M schedule uses a sparse subset of the 1M grid.

The head dimension is viewed as `head_dim/2` adjacent pairs; the first half of the pairs rotate
by the row angle, the second half by the column angle.
"""
from __future__ import annotations

import torch

from . import schedules as S

ROPE_BASE = 10000.0


def inv_freq(head_dim: int) -> torch.Tensor:
    half = head_dim // 2  # pairs per head; half/2 frequencies for rows, half/2 for columns
    return 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))


def grid_positions(schedule) -> torch.Tensor:
    """Integer (row, col) positions of every token of the schedule on the 1M final grid: [L, 2]."""
    template = S.template_of(schedule)
    final_h, final_w = S.TEMPLATES[template][-1]
    rows_cols = []
    for _, h, w in schedule:
        r = torch.round(torch.arange(h, dtype=torch.float32) * (final_h / h))  # half-to-even
        c = torch.round(torch.arange(w, dtype=torch.float32) * (final_w / w))
        rr, cc = torch.meshgrid(r, c, indexing="ij")  # row-major tokens y*w + x
        rows_cols.append(torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=-1))
    return torch.cat(rows_cols).long()


def rope_cos_sin(schedule, head_dim: int) -> torch.Tensor:
    """cos/sin of the rotation angle of every pair slot of every token: [2, L, head_dim/2] fp32."""
    freqs = inv_freq(head_dim)                          # [half/2]
    pos = grid_positions(schedule)                      # [L, 2]
    # Angles as in the official 128x128 table: outer(position, inv_freq) in float32.
    grid = torch.arange(max(int(pos.max()) + 1, 1), dtype=torch.float32)
    table = torch.outer(grid, freqs)                    # [P, half/2]
    angles = torch.cat([table[pos[:, 0]], table[pos[:, 1]]], dim=-1)  # [L, half]
    return torch.stack([angles.cos(), angles.sin()])


def rope_rotation(schedule, head_dim: int) -> torch.Tensor:
    """The same rotations as unit complex numbers cos + i sin: [L, head_dim/2] complex64."""
    cos, sin = rope_cos_sin(schedule, head_dim)
    return torch.complex(cos, sin)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1) of the last dim: (x0 cos - x1 sin, x0 sin + x1 cos), i.e.
    one complex multiplication per pair (the same products as the official real formula; one
    pass over x instead of eight). x: [..., c] fp32; rotation: complex, broadcastable to
    [..., c/2] (e.g. [L, 1, 1, c/2] for x [B, L, 2, H, c]). Returns fp32 [..., c]."""
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # [..., c/2]
    return torch.view_as_real(pairs * rotation).flatten(-2)
