"""Kernel maps of the CPU sparse path: which site each site reads through each kernel offset.

A `SiteSet` is the coordinates of one batch at one resolution. Its maps are computed once and
kept on it, so every convolution on the same coordinates (a stage's blocks, forward and backward)
reuses them; the stride-2 coordinates of the next stage hang off it the same way.

Maps come from a dense lookup grid instead of a hash table: the batch's bounding box (padded by
the kernel's reach, one box per scan stacked along the batch axis) becomes an int32 volume holding
each site's row, and a neighbour is one read at `site + offset` in that volume. On the grids here
(at most ~256^3 cells at the network input, far fewer after patches and downsampling) this is
~5x faster than MinkowskiEngine 0.5.4's hashing (docs/design.md, "CPU sparse convolution").
A box too large for a lookup volume falls back to a binary search over the sorted site keys.

Kernel offsets follow MinkowskiEngine's kernel order, so weights mean the same offsets on both
paths: cube offsets with x fastest, then y, then z; the cross as ctsparse's ME patch enumerates it
(centre, then -r..-1, 1..r along x, y, z); an even size (the stride-2 downsampling) spans 0..size-1.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

Offsets = tuple[tuple[int, int, int], ...]

# A lookup volume is used up to this many cells (int32: 128 MiB) and while it has at most this many
# cells per site; beyond either, sorted keys and a binary search (slower, no large buffer).
MAX_LOOKUP_CELLS = 1 << 25
MAX_CELLS_PER_SITE = 4096
# largest lookup volume a thread keeps for the next map build (int32: 16 MiB)
REUSED_LOOKUP_CELLS = 1 << 22
# keys queried per step of a map build: the temporaries stay small enough for the allocator to
# reuse (a fresh multi-megabyte buffer costs more in page faults than the lookups themselves)
QUERY_ROWS = 1 << 16
# rows a map's density is counted on (the spacing between them is even across the table)
DENSITY_ROWS = 1 << 14


def _axis_steps(size: int) -> list[int]:
    return list(range(-(size // 2), size // 2 + 1)) if size % 2 else list(range(size))


def kernel_offsets(size: int, cross: bool = False) -> Offsets:
    """The (dx, dy, dz) of each kernel index of a size-`size` cube or cross, in ME's order."""
    if cross and size % 2 and size > 1:
        steps = [s for s in _axis_steps(size) if s != 0]
        return (
            (0, 0, 0),
            *((s, 0, 0) for s in steps),
            *((0, s, 0) for s in steps),
            *((0, 0, s) for s in steps),
        )
    steps = _axis_steps(size)
    return tuple((x, y, z) for z, y, x in itertools.product(steps, steps, steps))


def mirror(offsets: Offsets) -> list[int] | None:
    """For each kernel index, the index of the opposite offset (None if a set lacks one)."""
    where = {o: i for i, o in enumerate(offsets)}
    out = [where.get((-o[0], -o[1], -o[2])) for o in offsets]
    return None if any(i is None for i in out) else [int(i) for i in out if i is not None]


class _Box:
    """Linear cell index of (batch, x, y, z) in the bounding box of `coords`, padded by `pad`.

    Keys are int32 when the box has fewer than 2^31 cells (always, on the lookup-volume path):
    int32 arithmetic and int32 gather indices halve the memory traffic of a map build.
    """

    def __init__(self, coords: torch.Tensor, pad: int) -> None:
        low, high = (v.long() for v in torch.aminmax(coords, dim=0))  # one pass over the rows
        lo = low[1:] - pad
        self.dims = [int(d) for d in (high[1:] - lo + 1 + pad).tolist()]
        self.batches = int(high[0]) + 1
        self.cells = self.batches * self.dims[0] * self.dims[1] * self.dims[2]
        self.dtype = torch.int32 if self.cells < 2**31 else torch.int64
        self.origin = torch.cat([torch.zeros(1, dtype=torch.int64), lo]).to(self.dtype)
        x, y, z = self.dims
        steps = torch.tensor([x * y * z, y * z, z, 1], dtype=torch.int64)
        self._shift = int((self.origin.long() * steps).sum())
        # the key before the shift, for coords within [low, high]: int32 arithmetic if it fits
        raw = max(abs(int((low * steps).sum())), abs(int((high * steps).sum())), abs(self._shift))
        self._raw_dtype = torch.int32 if raw < 2**31 else torch.int64
        self._steps = steps.to(self._raw_dtype).numpy()

    def key(self, coords: torch.Tensor) -> torch.Tensor:
        """((b * X + x - x0) * Y + y - y0) * Z + z - z0 of coords inside the box, as one
        matrix-vector product over the (N, 4) rows: numpy's integer matvec takes half the time
        of torch's column-by-column ops."""
        k = torch.from_numpy(coords.to(self._raw_dtype).numpy() @ self._steps)
        k -= self._shift
        return k.to(self.dtype)

    def delta(self, offsets: Offsets) -> torch.Tensor:
        sy, sx = self.dims[2], self.dims[1] * self.dims[2]
        return torch.tensor([dx * sx + dy * sy + dz for dx, dy, dz in offsets], dtype=self.dtype)

    def decode(self, key: torch.Tensor) -> torch.Tensor:
        out = []
        for size in reversed(self.dims):
            out.append(key.remainder(size))
            key = key.div(size, rounding_mode="floor")
        out.append(key)
        return (torch.stack(out[::-1], 1) + self.origin).int()

    def lookup_ok(self, n: int) -> bool:
        return self.cells <= MAX_LOOKUP_CELLS and self.cells <= MAX_CELLS_PER_SITE * max(n, 1)


_local = threading.local()


def _lookup_volume(cells: int, fill: int) -> torch.Tensor:
    """An int32 volume of `cells` cells set to `fill`, in this thread's reusable buffer up to
    REUSED_LOOKUP_CELLS: a fresh volume of a few megabytes costs more in page faults than filling
    it (4.5 MB: 1.5 ms to 0.3). A larger one is allocated fresh: its faults are a small part of a
    map build over that many sites, and the thread does not keep it."""
    if cells > REUSED_LOOKUP_CELLS:
        return torch.full((cells,), fill, dtype=torch.int32)
    buf: torch.Tensor | None = getattr(_local, "lut", None)
    if buf is None or buf.numel() < cells:
        buf = _local.lut = torch.empty(cells, dtype=torch.int32)
    return buf[:cells].fill_(fill)


class _Index:
    """Row of a key among `keys` (n when absent): a lookup volume or a sorted search. One index
    per thread at a time: the lookup volume is the thread's reusable buffer."""

    def __init__(self, box: _Box, keys: torch.Tensor) -> None:
        self.n = keys.shape[0]
        if box.lookup_ok(self.n):
            self.lut: torch.Tensor | None = _lookup_volume(box.cells, self.n)
            self.lut[keys.long()] = torch.arange(self.n, dtype=torch.int32)
        else:
            self.lut = None
            self.sorted, self.order = torch.sort(keys)

    def rows(self, query: torch.Tensor, out: torch.Tensor) -> None:
        """out[...] = the row of each key of `query` (same shape, int32)."""
        if self.lut is not None:  # index_select with int32 indices: 3x faster than lut[query]
            torch.index_select(self.lut, 0, query.reshape(-1), out=out.view(-1))
            return
        pos = torch.searchsorted(self.sorted, query).clamp_(max=max(self.n - 1, 0))
        hit = self.sorted[pos] == query
        out.copy_(torch.where(hit, self.order[pos], self.n))


@dataclass(eq=False)
class KernelMap:
    """Which input row each output row reads through each kernel offset.

    table: (M, K) int32, n_in where an output has no input at that offset (a zero row).
    """

    table: torch.Tensor
    n_in: int
    centre: int | None = None  # the offset through which every row reads itself (submanifold)
    _density: float | None = field(default=None, repr=False)
    _pairs: Pairs | None = field(default=None, repr=False)

    @property
    def density(self) -> float:
        """The fraction of (output, offset) slots that hold an input site, counted on every row of
        a map of up to DENSITY_ROWS rows and on evenly spaced rows of a larger one: it only picks
        a map's path (models/siteconv.py), and a full count of a 655k x 27 table costs 30 ms."""
        if self._density is None:  # numpy: torch compares strided int32 rows 10x slower
            rows = self.table.numpy()[:: max(1, self.table.shape[0] // DENSITY_ROWS)]
            self._density = int(np.count_nonzero(rows < self.n_in)) / max(rows.size, 1)
        return self._density

    def pairs(self) -> Pairs:
        if self._pairs is None:
            self._pairs = _pairs(self.table, self.n_in, self.centre)
        return self._pairs


@dataclass(frozen=True)
class Pairs:
    """The map as (input, output) row pairs grouped by offset: the pairs of offset k are
    inputs[starts[k]:starts[k + 1]] and the same slice of outputs (int64). `identity`: an offset
    whose pairs are every row onto itself (a submanifold kernel's centre), left out of the lists."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    starts: list[int]
    identity: int | None


def _pairs(table: torch.Tensor, n_in: int, centre: int | None) -> Pairs:
    m, k = table.shape
    by_offset = table.t().contiguous()  # one nonzero over a flat mask: offset-major pairs
    keep = by_offset < n_in
    if centre is not None:
        keep[centre] = False
    flat = keep.view(-1).nonzero().squeeze(1)
    inputs = by_offset.view(-1).index_select(0, flat).long()
    counts = torch.bincount(flat.div(m, rounding_mode="floor"), minlength=k).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return Pairs(inputs, flat.remainder(m), starts, centre)


@dataclass(eq=False)
class SiteSet:
    """The sites of one batch at one resolution, with the maps computed on them so far.

    coords: (N, 4) int32 batch, x, y, z in units of this resolution (input coordinates // stride).
    stride: the resolution's step in input voxels (1, 2, 4, ...), as ME's tensor stride.
    """

    coords: torch.Tensor
    stride: int = 1
    _maps: dict[Offsets, KernelMap] = field(default_factory=dict, repr=False)
    _down: tuple[SiteSet, KernelMap] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def neighbours(self, offsets: Offsets) -> KernelMap:
        """The submanifold map: table (N, K), the row of the site at coords + offset k."""
        if offsets not in self._maps:
            centre = offsets.index((0, 0, 0)) if (0, 0, 0) in offsets else None
            self._maps[offsets] = KernelMap(_neighbour_table(self.coords, offsets), len(self), centre)
        return self._maps[offsets]

    def downsampled(self) -> tuple[SiteSet, KernelMap]:
        """The stride-2 sites (every cell of the 2x2x2 grid holding a site) and the map whose
        (M, 8) table lists their children in kernel order (dx + 2 dy + 4 dz)."""
        if self._down is None:
            self._down = _downsample(self.coords, self.stride)
        return self._down


def _neighbour_table(coords: torch.Tensor, offsets: Offsets) -> torch.Tensor:
    n, k = coords.shape[0], len(offsets)
    reach = max((max(abs(v) for v in o) for o in offsets), default=0)
    box = _Box(coords, reach)
    keys = box.key(coords)
    index = _Index(box, keys)
    delta = box.delta(offsets)
    table = torch.empty((n, k), dtype=torch.int32)
    step = max(1, QUERY_ROWS // max(k, 1))
    for s in range(0, n, step):
        index.rows(keys[s : s + step, None] + delta, out=table[s : s + step])
    return table


def _downsample(coords: torch.Tensor, stride: int) -> tuple[SiteSet, KernelMap]:
    # an arithmetic shift is a floor division, and & 1 the child's side, for negative
    # coordinates too (ME floors them the same way)
    c = coords.int()
    parent = torch.cat([c[:, :1], c[:, 1:] >> 1], 1)
    side = c[:, 1:] & 1
    k = side[:, 0] + 2 * side[:, 1] + 4 * side[:, 2]
    box = _Box(parent, 0)
    keys = box.key(parent)
    if box.lookup_ok(len(keys)):
        occupied = torch.zeros(box.cells, dtype=torch.bool)
        occupied[keys.long()] = True
        unique = occupied.nonzero().squeeze(1)
        lut = torch.empty(box.cells, dtype=torch.int32)
        lut[unique] = torch.arange(len(unique), dtype=torch.int32)
        inverse = lut.index_select(0, keys).long()
        unique = unique.to(keys.dtype)
    else:
        unique, inverse = torch.unique(keys, return_inverse=True)
    n = coords.shape[0]
    table = torch.full((len(unique), 8), n, dtype=torch.int32)
    table.view(-1).index_copy_(0, inverse * 8 + k, torch.arange(n, dtype=torch.int32))
    return SiteSet(box.decode(unique), stride * 2), KernelMap(table, n)
