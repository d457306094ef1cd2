"""A preallocated ring of replay rows in tensors on one device (optionally in shared memory).

Its columns are the fields of streamdqn.stream.rows.ReplayRows, laid out from ROW_LAYOUT: the learner
reads five of them, the verdict join rewrites rewards in place through the others.
"""

from __future__ import annotations

import numpy as np
import torch

from streamdqn.stream.rows import ROW_FIELDS, ROW_LAYOUT, ReplayRows

# The ring's format in a checkpoint; a replay saved in another format is refused, not misread.
STATE_FORMAT = "rows-1"


def _torch_dtype(dtype: np.dtype[np.generic]) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype)).dtype


def row_bytes() -> int:
    """Bytes one row takes in the ring."""
    return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for dtype, shape in ROW_LAYOUT.values())


class OldReplayFormatError(ValueError):
    """A replay state written by an older streamdqn (five transitions per step)."""


class TensorRing:
    """Fixed-capacity FIFO storage: rows are written at `cursor` and wrap around, evicting the oldest.

    `size` and `cursor` live in a small int64 tensor so that a copy in shared memory is seen by
    another process as well. Not thread-safe by itself: ReplayBuffer holds the lock.
    """

    def __init__(self, capacity: int, device: torch.device, *, shared: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.device = device
        # Allocated empty, moved to shared memory, then zeroed: zeros-then-share would hold both
        # copies at once (a peak of twice the buffer).
        self.columns: dict[str, torch.Tensor] = {
            name: torch.empty((capacity, *shape), dtype=_torch_dtype(dtype), device=device)
            for name, (dtype, shape) in ROW_LAYOUT.items()
        }
        # [size, cursor, total rows ever written]
        self.counters = torch.zeros(3, dtype=torch.int64)
        if shared:
            for t in self.columns.values():
                t.share_memory_()
            self.counters.share_memory_()
        for t in self.columns.values():
            t.zero_()
        self._c = self.counters.numpy()  # a view: element access is ~20x cheaper than on the tensor

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        del state["_c"]  # a numpy view would be pickled as a private copy
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._c = self.counters.numpy()

    @property
    def size(self) -> int:
        return int(self._c[0])

    @property
    def cursor(self) -> int:
        return int(self._c[1])

    @property
    def total_written(self) -> int:
        return int(self._c[2])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.columns.values())

    def write(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Write rows (already on this device); if more than capacity, only the newest are kept.
        Returns the ring positions written, in row order."""
        n = int(rows["horizon"].shape[0])
        if n > self.capacity:
            rows = {k: r[n - self.capacity :] for k, r in rows.items()}
            self._c[2] += n - self.capacity
            n = self.capacity
        cursor = self.cursor
        positions = (torch.arange(n, device=self.device) + cursor) % self.capacity
        if n == 0:
            return positions
        first = min(n, self.capacity - cursor)
        for name, dst in self.columns.items():
            src = rows[name]
            dst[cursor : cursor + first].copy_(src[:first], non_blocking=True)
            if first < n:
                dst[: n - first].copy_(src[first:], non_blocking=True)
        c = self._c
        c[0] = min(int(c[0]) + n, self.capacity)
        c[1] = (cursor + n) % self.capacity
        c[2] += n
        return positions

    def gather(self, index: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(self.columns[name].index_select(0, index) for name in names)

    def find(self, name: str, value: int) -> torch.Tensor:
        """Positions among the stored rows whose column `name` equals `value`."""
        column = self.columns[name][: self.size]
        return torch.nonzero(column == value).reshape(-1)

    def fifo_order(self) -> torch.Tensor:
        size, cursor = self.size, self.cursor
        start = (cursor - size) % self.capacity
        return (torch.arange(size, device=self.device) + start) % self.capacity

    def state_dict(self) -> dict[str, object]:
        """The stored rows in FIFO order (oldest first), on the CPU."""
        order = self.fifo_order()
        out: dict[str, object] = {name: t.index_select(0, order).cpu() for name, t in self.columns.items()}
        out["format"] = STATE_FORMAT
        out["total_written"] = int(self.counters[2])
        return out

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise OldReplayFormatError(
                "this replay state was written by an older streamdqn (five transitions per step, format "
                f"{state.get('format', 'unversioned')!r}; this version reads {STATE_FORMAT!r})"
            )
        self.counters.zero_()
        rows = {}
        for name in ROW_FIELDS:
            value = state[name]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"replay state: column {name!r} is not a tensor")
            rows[name] = value.to(self.device)
        self.write(rows)
        self.counters[2] = int(state["total_written"])  # type: ignore[call-overload]


def rows_to_numpy(columns: dict[str, torch.Tensor]) -> ReplayRows:
    return ReplayRows(*(columns[name].cpu().numpy() for name in ROW_FIELDS))
