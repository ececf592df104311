"""The MinkowskiEngine build computes what a dense convolution computes.

A mis-compiled or mis-linked build (wrong BLAS, broken kernel maps, bad OpenMP) fails here: a
MinkowskiConvolution on a random sparse set must equal torch's conv3d on the densified grid, at the
active sites, forward and backward, to float64 round-off.
"""

from __future__ import annotations

import pytest
import torch

ME = pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")


def me_kernel_from_dense(w: torch.Tensor) -> torch.Tensor:
    """torch weight (Cout, Cin, 3, 3, 3) -> ME kernel (27, Cin, Cout).

    ME enumerates the 27 offsets of a 3x3x3 hypercube with the first axis fastest:
    k = (dx+1) + 3*(dy+1) + 9*(dz+1). Both libraries compute cross-correlation.
    """
    kernels = []
    for k in range(27):
        dx, dy, dz = k % 3, (k // 3) % 3, k // 9
        kernels.append(w[:, :, dx, dy, dz].T)
    return torch.stack(kernels)


def random_sparse(rng: torch.Generator, n_batch: int, size: int, occupancy: float, channels: int):
    mask = torch.rand((n_batch, size, size, size), generator=rng) < occupancy
    coords = mask.nonzero().to(torch.int32).contiguous()
    feats = torch.randn((coords.shape[0], channels), generator=rng, dtype=torch.float64)
    return mask, coords, feats


@pytest.mark.parametrize(("cin", "cout", "occupancy"), [(1, 4, 0.3), (5, 7, 0.1), (8, 3, 0.6)])
def test_sparse_conv_matches_dense_conv3d_forward_and_backward(cin: int, cout: int, occupancy: float) -> None:
    rng = torch.Generator().manual_seed(1234 + cin)
    n_batch, size = 2, 9
    _, coords, feats = random_sparse(rng, n_batch, size, occupancy, cin)
    w = torch.randn((cout, cin, 3, 3, 3), generator=rng, dtype=torch.float64)
    b = torch.randn((cout,), generator=rng, dtype=torch.float64)
    grad_out = torch.randn((coords.shape[0], cout), generator=rng, dtype=torch.float64)

    # sparse path
    conv = ME.MinkowskiConvolution(cin, cout, kernel_size=3, stride=1, bias=True, dimension=3).double()
    with torch.no_grad():
        conv.kernel.copy_(me_kernel_from_dense(w))
        conv.bias.copy_(b)
    feats_sp = feats.clone().requires_grad_(True)
    x = ME.SparseTensor(feats_sp, coordinates=coords)
    y = conv(x)
    # ME may reorder output rows; map them back to the input order through the coordinates
    order = {tuple(c): i for i, c in enumerate(y.C.tolist())}
    perm = torch.tensor([order[tuple(c)] for c in coords.tolist()])
    y_sparse = y.F[perm]
    (y_sparse * grad_out).sum().backward()

    # dense path on the same data
    dense = torch.zeros((n_batch, cin, size, size, size), dtype=torch.float64)
    bi, xi, yi, zi = coords.long().unbind(1)
    dense[bi, :, xi, yi, zi] = feats
    dense.requires_grad_(True)
    w_d = w.clone().requires_grad_(True)
    out = torch.nn.functional.conv3d(dense, w_d, b, padding=1)
    y_dense = out[bi, :, xi, yi, zi]
    (y_dense * grad_out).sum().backward()

    assert coords.shape[0] > 20
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-10, atol=1e-10)
    assert dense.grad is not None and feats_sp.grad is not None and w_d.grad is not None
    torch.testing.assert_close(feats_sp.grad, dense.grad[bi, :, xi, yi, zi], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(conv.kernel.grad, me_kernel_from_dense(w_d.grad), rtol=1e-10, atol=1e-10)


def test_strided_sparse_conv_matches_dense_at_output_sites() -> None:
    """Stride 2 (the downsampling the classifier uses): outputs live at even coordinates."""
    rng = torch.Generator().manual_seed(7)
    _, coords, feats = random_sparse(rng, 1, 10, 0.3, 3)
    w = torch.randn((4, 3, 3, 3, 3), generator=rng, dtype=torch.float64)
    conv = ME.MinkowskiConvolution(3, 4, kernel_size=3, stride=2, bias=False, dimension=3).double()
    with torch.no_grad():
        conv.kernel.copy_(me_kernel_from_dense(w))
    y = conv(ME.SparseTensor(feats, coordinates=coords))
    dense = torch.zeros((1, 3, 10, 10, 10), dtype=torch.float64)
    bi, xi, yi, zi = coords.long().unbind(1)
    dense[bi, :, xi, yi, zi] = feats
    # ME's strided output site c (a multiple of 2) sums inputs at c + offset, like conv3d with
    # padding 1 evaluated at c.
    full = torch.nn.functional.conv3d(dense, w, padding=1)
    oc = y.C.long()
    assert (oc[:, 1:] % 2 == 0).all()
    expected = full[oc[:, 0], :, oc[:, 1], oc[:, 2], oc[:, 3]]
    torch.testing.assert_close(y.F, expected, rtol=1e-10, atol=1e-10)


# The cross's offsets in the order of scripts/me-patches/0002 (centre, then -1 and +1 per axis)
from ctsparse.models.minkowski import CROSS_OFFSETS  # noqa: E402 - after the importorskip above


def me_cross_kernel_from_dense(w: torch.Tensor) -> torch.Tensor:
    """torch weight (Cout, Cin, 3, 3, 3), only its cross used -> ME kernel (7, Cin, Cout)."""
    return torch.stack([w[:, :, dx + 1, dy + 1, dz + 1].T for dx, dy, dz in CROSS_OFFSETS])


def cross_mask() -> torch.Tensor:
    mask = torch.zeros((3, 3, 3), dtype=torch.float64)
    for dx, dy, dz in CROSS_OFFSETS:
        mask[dx + 1, dy + 1, dz + 1] = 1.0
    return mask


@pytest.mark.parametrize("tensor_stride", [1, 2])
def test_cross_kernel_is_the_centre_and_its_six_face_neighbours(tensor_stride: int) -> None:
    """ME 0.5.4 as released enumerated a HYPER_CROSS region with the hypercube's first 7 indices (7
    corner offsets, no centre: ME issue #436); scripts/me-patches/0002 fixes it. Forward and
    backward must equal conv3d with the weights outside the cross zeroed, also on a coarser level
    (tensor stride 2, the classifier's later stages), where neighbours are 2 apart."""
    rng = torch.Generator().manual_seed(21 + tensor_stride)
    cin, cout, size = 3, 5, 9
    mask, coords, feats = random_sparse(rng, 2, size, 0.35, cin)
    w = torch.randn((cout, cin, 3, 3, 3), generator=rng, dtype=torch.float64) * cross_mask()
    grad_out = torch.randn((coords.shape[0], cout), generator=rng, dtype=torch.float64)
    gen = ME.KernelGenerator(3, 1, 1, region_type=ME.RegionType.HYPER_CROSS, dimension=3)
    conv = ME.MinkowskiConvolution(cin, cout, kernel_size=3, bias=False, kernel_generator=gen, dimension=3)
    conv = conv.double()
    assert conv.kernel.shape == (7, cin, cout)
    with torch.no_grad():
        conv.kernel.copy_(me_cross_kernel_from_dense(w))
    feats_sp = feats.clone().requires_grad_(True)
    scaled = coords.clone()
    scaled[:, 1:] *= tensor_stride
    y = conv(ME.SparseTensor(feats_sp, coordinates=scaled, tensor_stride=tensor_stride))
    order = {tuple(c): i for i, c in enumerate(y.C.tolist())}
    y_sparse = y.F[torch.tensor([order[tuple(c)] for c in scaled.tolist()])]
    (y_sparse * grad_out).sum().backward()

    dense = torch.zeros((2, cin, size, size, size), dtype=torch.float64)
    bi, xi, yi, zi = coords.long().unbind(1)
    dense[bi, :, xi, yi, zi] = feats
    dense.requires_grad_(True)
    w_d = w.clone().requires_grad_(True)
    y_dense = torch.nn.functional.conv3d(dense, w_d, padding=1)[bi, :, xi, yi, zi]
    (y_dense * grad_out).sum().backward()

    assert mask.sum() > 100
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-10, atol=1e-10)
    assert feats_sp.grad is not None and dense.grad is not None and w_d.grad is not None
    torch.testing.assert_close(feats_sp.grad, dense.grad[bi, :, xi, yi, zi], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(conv.kernel.grad, me_cross_kernel_from_dense(w_d.grad), rtol=1e-10, atol=1e-10)


def test_float32_matches_within_single_precision() -> None:
    """The float32 path goes through the BLAS ME was linked against (the classifier's dtype)."""
    rng = torch.Generator().manual_seed(3)
    _, coords, feats = random_sparse(rng, 1, 12, 0.4, 16)
    w = torch.randn((32, 16, 3, 3, 3), generator=rng, dtype=torch.float64)
    conv = ME.MinkowskiConvolution(16, 32, kernel_size=3, bias=False, dimension=3)
    with torch.no_grad():
        conv.kernel.copy_(me_kernel_from_dense(w).float())
    y = conv(ME.SparseTensor(feats.float(), coordinates=coords))
    order = {tuple(c): i for i, c in enumerate(y.C.tolist())}
    perm = torch.tensor([order[tuple(c)] for c in coords.tolist()])
    dense = torch.zeros((1, 16, 12, 12, 12), dtype=torch.float64)
    bi, xi, yi, zi = coords.long().unbind(1)
    dense[bi, :, xi, yi, zi] = feats
    ref = torch.nn.functional.conv3d(dense, w, padding=1)[bi, :, xi, yi, zi]
    torch.testing.assert_close(y.F[perm].double(), ref, rtol=1e-4, atol=1e-4)


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and bool(ME.is_cuda_available())


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and a CUDA build of MinkowskiEngine")
def test_cuda_convolution_matches_cpu() -> None:
    rng = torch.Generator().manual_seed(11)
    _, coords, feats = random_sparse(rng, 2, 16, 0.2, 8)
    conv = ME.MinkowskiConvolution(8, 16, kernel_size=3, dimension=3)
    x_cpu = ME.SparseTensor(feats.float(), coordinates=coords)
    y_cpu = conv(x_cpu)
    conv_gpu = conv.to("cuda")
    y_gpu = conv_gpu(ME.SparseTensor(feats.float(), coordinates=coords, device="cuda"))
    cpu_rows = {tuple(c): f for c, f in zip(y_cpu.C.tolist(), y_cpu.F, strict=True)}
    got = torch.stack([cpu_rows[tuple(c)] for c in y_gpu.C.cpu().tolist()])
    torch.testing.assert_close(y_gpu.F.cpu(), got, rtol=1e-4, atol=1e-4)
