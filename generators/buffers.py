"""A bounded first-in-first-out store of tensors on the device.

CMI's memory bank of features and the image pool of the inversion methods are
both this: a fixed number of rows, preallocated on the device, where a full
store overwrites its oldest rows. Writes and reads take index tensors built on
the device from Python counters, so neither waits for the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RingBuffer"]


class RingBuffer(nn.Module):
    """``capacity`` rows of shape ``row_shape``, preallocated; when full, appending overwrites the oldest.

    The rows are the buffer ``data`` and the write position and fill count are
    the module's extra state, so :meth:`state_dict` holds everything needed to
    resume.

    Args:
        capacity: the most rows kept.
        row_shape: the shape of one row, e.g. ``(2 * D,)`` for features or ``(C, H, W)`` for images.
        dtype: the storage type (``float16`` for CMI's bank, ``uint8`` for an image pool).
        device: where the rows live.
    """

    data: Tensor

    def __init__(
        self, capacity: int, row_shape: Sequence[int], dtype: torch.dtype, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"a ring buffer needs a capacity of at least 1, got {capacity}")
        self.capacity = capacity
        self.register_buffer("data", torch.zeros(capacity, *row_shape, dtype=dtype, device=device))
        self.cursor = 0  # where the next row is written
        self.filled = 0  # how many rows hold data

    def __len__(self) -> int:
        return self.filled

    def append(self, rows: Tensor) -> None:
        """Store ``rows [n, *row_shape]`` (cast to the storage type); beyond capacity, the last ones win."""
        rows = rows.detach()[-self.capacity :]
        n = len(rows)
        index = (torch.arange(n, device=self.data.device) + self.cursor) % self.capacity
        self.data.index_copy_(0, index, rows.to(self.data.dtype))
        self.cursor = (self.cursor + n) % self.capacity
        self.filled = min(self.filled + n, self.capacity)

    def stored(self) -> Tensor:
        """``[len(self), *row_shape]``: every row holding data, in storage order (not age order)."""
        return self.data[: self.filled]

    def newest(self, n: int) -> Tensor:
        """``[min(n, len(self)), *row_shape]``: the last rows appended, oldest first."""
        n = min(n, self.filled)
        index = (torch.arange(n, device=self.data.device) + (self.cursor - n)) % self.capacity
        return self.data[index]

    def get_extra_state(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "filled": self.filled}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.cursor, self.filled = int(state["cursor"]), int(state["filled"])

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, row_shape={tuple(self.data.shape[1:])}, dtype={self.data.dtype}"
