"""The arithmetic of the CPU sparse path: convolutions along a kernel map, in torch ops.

Two ways to run a map, picked per map by its density (models/siteconv.py):

- im2col over row chunks: for R output sites, the input rows of their K neighbours (a zero row
  where there is none) are gathered into one (R, K * cin) matrix and multiplied by the
  (K * cin, cout) kernel, ME's (K, cin, cout) weight as it is. Chunks of about two megabytes stay in
  cache, and one GEMM per chunk replaces ME's serial per-offset gather, small GEMM and scatter-add.
  grad_input of a submanifold map is the same gather on the same table (site j reads site i through
  offset d exactly when i reads j through -d), so that backward pass never scatters; that of the
  stride-2 downsampling is a scatter in which every input row is written once.
- pairs, for sparse neighbourhoods: per offset, gather the inputs that have an output there,
  multiply, scatter-add. Only present pairs are multiplied; a submanifold centre (every site onto
  itself) is one GEMM without gather or scatter.

Every gather and GEMM of a chunk writes into one scratch buffer per thread, reused from call to
call: a fresh megabyte-sized tensor per chunk costs more in page faults than the gather itself
(index_select of 16 floats per row: 7 ns into a reused buffer, 20 ns into a new one).

The GEMMs of float32 CPU tensors (forward, input gradient, and the weight gradient on full chunks)
run on oneDNN's matmul where torch has it (`_Product`, `_add_product`): on an AMD EPYC with
AVX-512, torch.mm (MKL) multiplies a gathered (1213, 432) chunk by a (432, 16) kernel at 90
GFLOP/s and oneDNN at 172 (benchmarks/bench_onednn_gemm.py). oneDNN builds one primitive per
shape, at 0.1-0.3 ms each (a chunk of a new height runs at a fifth of the speed), so the GEMMs run
on a few heights only: a full chunk, or a partial one rounded up to an eighth of a chunk (a power
of two below that); the rows past the partial chunk's end are computed and dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ctsparse.models.sitemaps import Pairs

# floats in one chunk's gathered matrix (~2 MiB): measured best between 256 KiB and 4 MiB; 2 MiB
# ran the classifier's forward and backward 2-8 % faster than 1 MiB in paired runs
CHUNK_FLOATS = 1 << 19
_local = threading.local()


def _rows(width: int) -> int:
    return max(32, CHUNK_FLOATS // max(width, 1))


def _scratch(slot: int, rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """A (rows, width) tensor from this thread's reusable buffer number `slot` (zeros at first,
    then whatever the last user left)."""
    key = (slot, like.dtype, like.device)
    buffers: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = _local.__dict__.setdefault(
        "buffers", {}
    )
    buf = buffers.get(key)
    if buf is None or buf.numel() < rows * width:
        buf = buffers[key] = like.new_zeros(max(rows * width, CHUNK_FLOATS + 4096))
    return buf[: rows * width].view(rows, width)


def _onednn_linear() -> bool:
    """Whether this torch has oneDNN's matmul (torch.ops.mkldnn._linear_pointwise) and it agrees
    with torch.mm. On fixed inputs: an import must not draw from torch's random generator."""
    try:
        a = torch.arange(15, dtype=torch.float32).view(5, 3).sin()
        w = torch.arange(12, dtype=torch.float32).view(4, 3).cos()
        got = torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
        return bool(torch.backends.mkldnn.is_available() and torch.allclose(got, a @ w.t(), atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


# oneDNN's matmul for float32 CPU GEMMs (a switch for tests and benchmarks)
ONEDNN = _onednn_linear()


def _onednn_for(like: torch.Tensor) -> bool:
    return ONEDNN and like.dtype == torch.float32 and like.device.type == "cpu"


def _height(rows: int, step: int) -> int:
    """The rows a partial chunk of `rows` is computed on: a multiple of an eighth of a full chunk
    of `step` rows, or below that the next power of two (at least 32), so that oneDNN meets a few
    GEMM shapes per layer width instead of one per chunk."""
    if rows >= step:
        return rows
    eighth = max(32, step // 8)
    if rows <= eighth:
        return min(eighth, 1 << max(5, (rows - 1).bit_length()))
    return min(step, -(-rows // eighth) * eighth)


class _Product:
    """x @ w for one (width, cout) matrix w and chunks of gathered rows: on oneDNN for float32 CPU
    tensors when this torch has it, else torch.mm."""

    def __init__(self, w: torch.Tensor, like: torch.Tensor) -> None:
        self.w = w
        self.onednn = _onednn_for(like)
        self.wt = w.t().contiguous() if self.onednn else w

    def rows(self, rows: int, step: int) -> int:
        """The height to gather a chunk of `rows` rows into (rows past `rows` are dropped)."""
        return _height(rows, step) if self.onednn else rows

    def rows_of(self, x: torch.Tensor, step: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w for a chunk x of at most `step` rows, not gathered (copied into scratch buffer 0
        if oneDNN wants it taller), into `out` if given."""
        rows = x.shape[0]
        height = self.rows(rows, step)
        if height > rows:
            a = _scratch(0, height, x.shape[1], x)
            a[:rows].copy_(x)
            x = a
        return self(x, rows, out)

    def __call__(self, a: torch.Tensor, rows: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The first `rows` rows of a @ w, written into `out` if given."""
        if not self.onednn:
            return torch.mm(a[:rows], self.w, out=out) if out is not None else a[:rows] @ self.w
        product = torch.ops.mkldnn._linear_pointwise(a, self.wt, None, "none", [], "")[:rows]
        return product if out is None else out.copy_(product)


@dataclass(frozen=True)
class Epilogue:
    """What inference fuses into a convolution, applied to each chunk of output rows while it is
    still in cache: a per-channel bias (a batch norm folded into the kernel), a residual to add,
    a ReLU. The output then has a zero row below it (padded_empty), which the next layer's gather
    reads for a missing neighbour instead of copying its input to append one."""

    bias: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    relu: bool = False

    def __call__(self, out: torch.Tensor, start: int) -> None:
        if self.bias is not None:
            out.add_(self.bias)
        if self.residual is not None:
            out.add_(self.residual[start : start + out.shape[0]])
        if self.relu:
            out.clamp_min_(0)


def padded_empty(rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (rows, width) tensor, the top of a (rows + 1, width) buffer whose last row
    is zero: `_padded` of it is its buffer, no copy."""
    buf = like.new_empty(rows + 1, width)
    buf[rows].zero_()
    return buf[:rows]


def _padded(x: torch.Tensor) -> torch.Tensor:
    """x with a zero row appended: the row a missing neighbour (index N) reads. A tensor from
    padded_empty whose zero row is still zero gives its buffer back; any other is copied."""
    base = x._base
    if (
        base is not None
        and x.is_contiguous()
        and base.is_contiguous()
        and base.shape == (x.shape[0] + 1, x.shape[1])
        and x.data_ptr() == base.data_ptr()
        and not bool(base[-1].any())
    ):
        return base
    return torch.cat([x, x.new_zeros(1, x.shape[1])])


def _add_product(acc_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, step: int) -> None:
    """acc_t += (a^T @ b)^T for chunks a (R, P) and b (R, Q) of a weight gradient; acc_t (Q, P).

    On oneDNN for a full chunk of `step` rows (b^T @ a there: 1.5-6x torch.mm's speed on these
    shapes); a partial chunk has a height oneDNN has not met, and runs on torch.mm."""
    if a.shape[0] == step and _onednn_for(a):
        acc_t += torch.ops.mkldnn._linear_pointwise(b.t(), a.t(), None, "none", [], "")
    else:
        acc_t.addmm_(b.t(), a)


def _gather(src: torch.Tensor, rows: torch.Tensor, slot: int = 0, height: int = 0) -> torch.Tensor:
    """src's rows at `rows` (R, K) as one (R, K * width) matrix in scratch buffer `slot`; with
    `height` > R, the top of a (height, K * width) matrix whose other rows are left as they are."""
    r, width = rows.shape[0], rows.shape[1] * src.shape[1]
    out = _scratch(slot, max(r, height), width, src)
    torch.index_select(src, 0, rows.reshape(-1), out=out[:r].view(-1, src.shape[1]))
    return out


def gather_gemm(
    x: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, epilogue: Epilogue | None = None
) -> torch.Tensor:
    """out[i] = sum_k x[table[i, k]] @ weight[k] (rows of x at index len(x) read as zeros), then
    the epilogue if one is given (its output from padded_empty).

    x: (N, cin); table: (M, K) int32; weight: (K, cin, cout). Returns (M, cout).
    """
    m, k = table.shape
    w2 = weight.reshape(k * weight.shape[1], weight.shape[2])
    out = x.new_empty(m, w2.shape[1]) if epilogue is None else padded_empty(m, w2.shape[1], x)
    xp = _padded(x)
    product = _Product(w2, x)
    step = _rows(w2.shape[0])
    for s in range(0, m, step):
        chunk = out[s : s + step]
        rows = chunk.shape[0]
        product(_gather(xp, table[s : s + step], height=product.rows(rows, step)), rows, chunk)
        if epilogue is not None:
            epilogue(chunk, s)
    return out


def gather_weight_grad(x: torch.Tensor, table: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(weight) of gather_gemm: sum over chunks of gathered-x^T @ grad_out, (K, cin, cout)."""
    m, k = table.shape
    cin = x.shape[1]
    gw_t = x.new_zeros(grad_out.shape[1], k * cin)
    xp = _padded(x)
    step = _rows(k * cin)
    for s in range(0, m, step):
        _add_product(gw_t, _gather(xp, table[s : s + step]), grad_out[s : s + step], step)
    return gw_t.t().reshape(k, cin, -1)


def submanifold_backward(
    x: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, flip: list[int],
    input_grad: bool, weight_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """Both gradients of a submanifold gather_gemm from one gather of the output gradient.

    Site j reads site i = table[j, k] through offset k exactly when i reads j through the mirrored
    offset flip[k]. With G the gathered rows grad_out[table[j, :]] of a chunk of sites j:
    grad_x[j] = G @ (weight[flip] transposed), and G^T @ x[j] summed over chunks holds
    grad_weight[flip[k]]^T in block k, so the input rows never need gathering.
    """
    k, cin, cout = weight.shape
    product = _Product(weight[flip].transpose(1, 2).reshape(k * cout, cin), x)
    gx = x.new_empty(x.shape[0], cin) if input_grad else None
    gwt_t = x.new_zeros(cin, k * cout) if weight_grad else None
    gp = _padded(grad_out)
    step = _rows(k * cout)
    for s in range(0, x.shape[0], step):
        rows = min(step, x.shape[0] - s)
        g = _gather(gp, table[s : s + step], height=product.rows(rows, step) if gx is not None else 0)
        if gx is not None:
            product(g, rows, gx[s : s + step])
        if gwt_t is not None:
            _add_product(gwt_t, g[:rows], x[s : s + step], step)
    gw = None if gwt_t is None else gwt_t.t().reshape(k, cout, cin)[flip].transpose(1, 2)
    return gx, gw


def scatter_gemm(
    grad_out: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, n_in: int
) -> torch.Tensor:
    """grad_input of gather_gemm for a table in which each input row appears at most once."""
    m, k = table.shape
    cin = weight.shape[1]
    product = _Product(weight.permute(2, 0, 1).reshape(weight.shape[2], k * cin), grad_out)
    gx = grad_out.new_zeros(n_in + 1, cin)
    step = _rows(k * cin)
    for s in range(0, m, step):
        rows = table[s : s + step].reshape(-1)
        g = product.rows_of(grad_out[s : s + step], step)
        # the absent-child index n_in collects several rows; it is dropped below
        gx.index_copy_(0, rows.long(), g.view(-1, cin))
    return gx[:n_in]


def _pair_chunks(pairs: Pairs, k: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    lo, hi = pairs.starts[k], pairs.starts[k + 1]
    return [
        (pairs.inputs[s : min(s + step, hi)], pairs.outputs[s : min(s + step, hi)])
        for s in range(lo, hi, step)
    ]


def pairs_forward(
    x: torch.Tensor, pairs: Pairs, weight: torch.Tensor, m: int, epilogue: Epilogue | None = None
) -> torch.Tensor:
    """out[o] = sum over the pairs (i, o) of offset k of x[i] @ weight[k]; (m, cout); then the
    epilogue if one is given (its output from padded_empty)."""
    cin, cout = weight.shape[1], weight.shape[2]
    out = x.new_empty(m, cout) if epilogue is None else padded_empty(m, cout, x)
    step = _rows(max(cin, cout))
    if pairs.identity is not None:
        centre = _Product(weight[pairs.identity], x)
        for s in range(0, m, step):
            centre.rows_of(x[s : s + step], step, out[s : s + step])
    else:
        out.zero_()
    for k in range(weight.shape[0]):
        product = _Product(weight[k], x)
        for rows, outs in _pair_chunks(pairs, k, step):
            n = len(rows)
            gathered = _gather(x, rows[:, None], height=product.rows(n, step))
            out.index_add_(0, outs, product(gathered, n))
    if epilogue is not None:
        epilogue(out, 0)
    return out


def pairs_backward(
    x: torch.Tensor, pairs: Pairs, weight: torch.Tensor, grad_out: torch.Tensor, input_grad: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    cin, cout = weight.shape[1], weight.shape[2]
    gx = x.new_zeros(x.shape) if input_grad else None
    gw = torch.zeros_like(weight) if weight_grad else None
    c = pairs.identity
    step = _rows(max(cin, cout))
    if c is not None:
        if gx is not None:
            centre = _Product(weight[c].t(), x)
            for s in range(0, x.shape[0], step):
                gx[s : s + step] += centre.rows_of(grad_out[s : s + step], step)
        if gw is not None:
            gw[c] = x.t() @ grad_out
    for k in range(weight.shape[0]):
        product = _Product(weight[k].t(), x)
        for rows, outs in _pair_chunks(pairs, k, step):
            n = len(rows)
            g = _gather(grad_out, outs[:, None], height=product.rows(n, step) if gx is not None else 0)
            if gx is not None:
                gx.index_add_(0, rows, product(g, n))
            if gw is not None:
                gw[k].addmm_(_gather(x, rows[:, None], slot=2).t(), g[:n])
    return gx, gw
