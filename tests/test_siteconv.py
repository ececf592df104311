"""The CPU sparse path (models/siteconv.py, models/sitemaps.py) against torch's conv3d and against
MinkowskiEngine: same values and gradients, same weights and checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctsparse.collate import collate
from ctsparse.config import ModelConfig
from ctsparse.models import create_model, siteconv, sitegemm, sitemaps
from ctsparse.models.siteconv import SiteTensor, site_conv
from ctsparse.models.sitemaps import SiteSet, kernel_offsets
from ctsparse.sparse_volume import SparseVolume

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")

SHAPE = (8, 6, 8)  # even: the stride-2 conv3d covers every cell


@pytest.fixture(autouse=True)
def cpu_kernels_on_small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine `sparse` hands small CPU batches to ME; these tests' batches are small on purpose."""
    from ctsparse.models import sparse

    monkeypatch.setattr(sparse, "CPU_KERNEL_MIN_SITES", 0)


def random_sites(rng: np.random.Generator, batch: int, occupancy: float) -> torch.Tensor:
    """(N, 4) int32 batch, x, y, z; an isolated site and an empty-ish scan included."""
    parts = []
    for b in range(batch):
        pts = np.argwhere(rng.random(SHAPE) < (occupancy if b != 1 else 0.03))
        pts = np.concatenate([pts, [[0, 0, 0], [7, 5, 7]]])  # two corners: isolated unless filled
        pts = np.unique(pts, axis=0)
        parts.append(np.concatenate([np.full((len(pts), 1), b), pts], 1))
    return torch.from_numpy(np.concatenate(parts).astype(np.int32))


def dense_weight(weight: torch.Tensor, size: int, offsets: sitemaps.Offsets) -> torch.Tensor:
    """ME's (K, cin, cout) kernel as conv3d's (cout, cin, s, s, s), zeros off the kernel."""
    low = -(size // 2) if size % 2 else 0
    out = weight.new_zeros(weight.shape[2], weight.shape[1], size, size, size)
    for k, (dx, dy, dz) in enumerate(offsets):
        out[:, :, dx - low, dy - low, dz - low] = weight[k].T
    return out


def densify(coords: torch.Tensor, feats: torch.Tensor, batch: int) -> torch.Tensor:
    grid = feats.new_zeros(batch, feats.shape[1], *SHAPE)
    c = coords.long()
    grid[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = feats
    return grid


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["im2col", "pairs"])
@pytest.mark.parametrize(
    ("size", "stride", "cross"), [(3, 1, False), (3, 1, True), (5, 1, True), (1, 1, False), (2, 2, False)]
)
def test_site_convolution_equals_conv3d_forward_and_backward(
    size: int, stride: int, cross: bool, path: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float64 runs on torch.mm; float32 on oneDNN's matmul where this torch has it, with chunks
    small enough that most GEMMs are partial chunks computed on a rounded-up height."""
    monkeypatch.setattr(siteconv, "PAIR_DENSITY", 10.0 if path == "pairs" else 0.0)
    monkeypatch.setattr(sitegemm, "CHUNK_FLOATS", 1 << 15)
    rng = np.random.default_rng(size + 10 * cross)
    batch, cin, cout = 3, 4, 5
    coords = random_sites(rng, batch, 0.35)
    offsets = kernel_offsets(size, cross)
    feats = torch.randn(len(coords), cin, dtype=dtype, requires_grad=True)
    shape = (cin, cout) if size == 1 else (len(offsets), cin, cout)  # ME keeps a size-1 kernel 2-D
    weight = torch.randn(*shape, dtype=dtype, requires_grad=True)
    out = site_conv(SiteTensor(feats, SiteSet(coords)), weight, size, stride, cross)
    ref_grid = F.conv3d(
        densify(coords, feats, batch),
        dense_weight(weight.view(len(offsets), cin, cout), size, offsets),
        stride=stride,
        padding=size // 2 if stride == 1 else 0,
    )
    oc = out.sites.coords.long()
    if stride == 2:  # the output sites are exactly the coarse cells holding an input site
        cells = torch.cat([coords[:, :1], coords[:, 1:].div(2, rounding_mode="floor")], 1)
        assert torch.equal(torch.unique(cells, dim=0), torch.unique(oc, dim=0))
        assert out.tensor_stride == [2, 2, 2] and torch.equal(out.C[:, 1:], 2 * out.sites.coords[:, 1:])
    ref = ref_grid[oc[:, 0], :, oc[:, 1], oc[:, 2], oc[:, 3]]
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}  # float32 sums in another order
    torch.testing.assert_close(out.F, ref, **tol)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out.F, (feats, weight), g)
    want = torch.autograd.grad(ref, (feats, weight), g)
    torch.testing.assert_close(got, want, **tol)


def test_partial_chunks_run_on_a_few_heights_that_hold_them() -> None:
    step = 1213
    heights = {sitegemm._height(r, step) for r in range(1, step + 1)}
    assert heights == {32, 64, 128, 151, 302, 453, 604, 755, 906, 1057, 1208, 1213}
    assert all(r <= sitegemm._height(r, step) <= step for r in range(1, step + 1))
    assert sitegemm._height(20, 100) == 32  # never fewer than 32 rows


@pytest.mark.skipif(not sitegemm.ONEDNN, reason="this torch has no oneDNN matmul: float32 runs on torch.mm")
def test_onednn_products_equal_torch_mm_on_full_and_partial_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sitegemm, "CHUNK_FLOATS", 1 << 15)
    rng = np.random.default_rng(3)
    sites = SiteSet(random_sites(rng, 2, 0.5))
    table = sites.neighbours(kernel_offsets(3)).table
    x, w = torch.randn(len(sites), 8), torch.randn(27, 8, 16)
    got = sitegemm.gather_gemm(x, table, w)
    monkeypatch.setattr(sitegemm, "ONEDNN", False)
    torch.testing.assert_close(got, sitegemm.gather_gemm(x, table, w), rtol=1e-5, atol=1e-5)
    assert len(sites) > sitegemm._rows(27 * 8) > len(sites) % sitegemm._rows(27 * 8)  # a partial chunk


def test_a_reused_lookup_volume_gives_the_maps_of_a_fresh_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread's lookup volume, dirty from a larger site set's build, gives the same maps as a
    fresh volume; a volume above the reuse limit is fresh and leaves the kept one alone."""
    rng = np.random.default_rng(5)
    large, small = random_sites(rng, 3, 0.6), random_sites(rng, 1, 0.2)
    offsets = kernel_offsets(3)
    SiteSet(large).neighbours(offsets)  # leaves its rows in the reused volume
    reused = SiteSet(small).neighbours(offsets).table
    monkeypatch.setattr(sitemaps, "REUSED_LOOKUP_CELLS", 0)
    kept = sitemaps._local.lut.clone()
    fresh = SiteSet(small).neighbours(offsets).table
    assert torch.equal(reused, fresh)
    assert torch.equal(sitemaps._local.lut, kept)


def test_an_isolated_site_reads_only_itself() -> None:
    coords = torch.tensor([[0, 0, 0, 0], [0, 5, 5, 5], [0, 5, 5, 6], [1, 0, 0, 1]], dtype=torch.int32)
    table = SiteSet(coords).neighbours(kernel_offsets(3)).table
    centre = kernel_offsets(3).index((0, 0, 0))
    assert table[0].tolist() == [4] * centre + [0] + [4] * (26 - centre)  # 4 = no site
    assert (table[3] < 4).sum() == 1  # scan 1's site does not see scan 0's neighbour at (0, 0, 0)
    assert int(table[1, kernel_offsets(3).index((0, 0, 1))]) == 2


def test_lookup_volume_and_sorted_search_give_the_same_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    coords = random_sites(np.random.default_rng(3), 2, 0.3)
    lookup = SiteSet(coords)
    tables = [lookup.neighbours(kernel_offsets(3)).table, lookup.neighbours(kernel_offsets(3, True)).table]
    down = lookup.downsampled()
    # built once per coordinate set: every layer on it (and its backward pass) reuses the maps
    assert lookup.neighbours(kernel_offsets(3)) is lookup.neighbours(kernel_offsets(3))
    assert lookup.downsampled()[1] is down[1]
    monkeypatch.setattr(sitemaps, "MAX_LOOKUP_CELLS", 0)
    search = SiteSet(coords)
    assert torch.equal(tables[0], search.neighbours(kernel_offsets(3)).table)
    assert torch.equal(tables[1], search.neighbours(kernel_offsets(3, True)).table)
    assert torch.equal(down[0].coords, search.downsampled()[0].coords)
    assert torch.equal(down[1].table, search.downsampled()[1].table)


@pytest.mark.parametrize("shift", [-(10**6), 10**6, 2**30])
def test_maps_do_not_depend_on_where_the_sites_lie(shift: int) -> None:
    # far from the origin the key before its shift leaves int32 and is computed in int64
    coords = random_sites(np.random.default_rng(4), 2, 0.3)
    moved = coords.clone()
    moved[:, 1:] += torch.tensor([shift, -shift // 2, 8], dtype=torch.int32)  # even: same 2x2x2 cells
    here, there = SiteSet(coords), SiteSet(moved)
    for offsets in (kernel_offsets(3), kernel_offsets(3, True)):
        assert torch.equal(here.neighbours(offsets).table, there.neighbours(offsets).table)
    assert torch.equal(here.downsampled()[1].table, there.downsampled()[1].table)


def random_sv(rng: np.random.Generator, shape: tuple[int, int, int], occupancy: float) -> SparseVolume:
    coords = np.ascontiguousarray(np.argwhere(rng.random(shape) < occupancy), dtype=np.int32)
    feats = rng.standard_normal((len(coords), 3)).astype(np.float32)
    return SparseVolume(coords, feats, shape, np.eye(4), {"features": "hu"}, {}, "random")


@pytest.mark.parametrize("kernel", ["cube", "cross"])
def test_network_on_the_cpu_path_equals_the_minkowski_network(kernel: str) -> None:
    rng = np.random.default_rng(0)
    svs = [
        random_sv(rng, (14, 12, 10), 0.3),
        random_sv(rng, (9, 16, 11), 0.2),
        random_sv(rng, (12, 8, 9), 0.05),
    ]
    cfg = ModelConfig(kernel=kernel, widths=[4, 8, 8], depths=[1, 1, 1], dropout=0.0, input_pooling=True)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = create_model(cfg, 3, 2)
    cpu = torch.device("cpu")
    for train in (False, True):
        model.train(train)
        results = []
        for backend in ("sparse", "minkowski"):
            inputs = collate(svs, None, ModelConfig(**{**vars(cfg), "backend": backend}), cpu).inputs
            model.zero_grad()
            logits = model(inputs)
            logits.sum().backward()
            results.append(
                (type(inputs).__name__, logits.detach(), [p.grad.clone() for p in model.parameters()])
            )
        (kind_a, out_a, grads_a), (kind_b, out_b, grads_b) = results
        assert (kind_a, kind_b) == ("SiteTensor", "SparseTensor")
        torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-4)
        for ga, gb in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-3 * float(gb.abs().max()) + 1e-6)


@pytest.mark.parametrize("kernel", ["cube", "cross"])
@pytest.mark.parametrize("path", ["im2col", "pairs"])
def test_fused_inference_equals_the_layer_by_layer_network(
    kernel: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without gradient and in eval mode, each convolution runs with its batch norm folded in and
    its residual and ReLU applied per chunk; the logits must equal the layer-by-layer ones, and the
    fused path must be the one taken."""
    from ctsparse.models import sitegemm

    monkeypatch.setattr(siteconv, "PAIR_DENSITY", 10.0 if path == "pairs" else 0.0)
    rng = np.random.default_rng(3)
    svs = [random_sv(rng, (14, 12, 10), 0.3), random_sv(rng, (9, 16, 11), 0.1)]
    cfg = ModelConfig(kernel=kernel, widths=[4, 8, 8], depths=[1, 2, 1], dropout=0.0)  # type: ignore[arg-type]
    torch.manual_seed(1)
    model = create_model(cfg, 3, 2)
    for m in model.modules():  # batch norms with statistics of their own, not the identity
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    model.eval()
    inputs = collate(svs, None, cfg, torch.device("cpu")).inputs
    assert isinstance(inputs, SiteTensor)
    with torch.enable_grad():
        reference = model(inputs).detach()
    fused_calls = []
    epilogue_call = sitegemm.Epilogue.__call__

    def counted(self: sitegemm.Epilogue, out: torch.Tensor, start: int) -> None:
        fused_calls.append(start)
        epilogue_call(self, out, start)

    monkeypatch.setattr(sitegemm.Epilogue, "__call__", counted)
    with torch.no_grad():
        fused = model(inputs)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    assert fused_calls, "the fused path was not taken"


def test_a_padded_buffer_is_read_in_place_and_a_dirty_one_is_copied() -> None:
    from ctsparse.models import sitegemm

    x = sitegemm.padded_empty(5, 3, torch.empty(0))
    x.copy_(torch.arange(15.0).view(5, 3))
    assert sitegemm._padded(x).data_ptr() == x.data_ptr()
    x._base[-1] = 1.0  # the zero row was written over: a fresh padded copy, zero at the end
    padded = sitegemm._padded(x)
    assert padded.data_ptr() != x.data_ptr()
    torch.testing.assert_close(padded, torch.cat([x, torch.zeros(1, 3)]))


def test_a_checkpoint_of_the_cpu_path_loads_into_minkowskiengine_and_back(tmp_path) -> None:
    from ctsparse.config import Config
    from ctsparse.models.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint

    rng = np.random.default_rng(4)
    svs = [random_sv(rng, (10, 9, 8), 0.3), random_sv(rng, (8, 8, 12), 0.2)]
    cpu = torch.device("cpu")
    for writer, reader in (("sparse", "minkowski"), ("minkowski", "sparse")):
        cfg = Config()
        cfg.model = ModelConfig(backend=writer, kernel="cross", widths=[4, 8], depths=[1, 1])
        torch.manual_seed(0)
        model = create_model(cfg.model, 3, 2).eval()
        path = tmp_path / f"{writer}.pt"
        save_checkpoint(path, model, cfg, ["a", "b"], 3)
        written = load_checkpoint(path)
        assert written.config.model.backend == writer
        assert written.implementation.startswith(
            "ctsparse CPU kernels (torch)" if writer == "sparse" else "MinkowskiEngine 0.5.4 (cpu)"
        )
        other, ckpt = build_from_checkpoint(path, backend=reader)
        assert ckpt.config.model.backend == reader
        with torch.no_grad():
            want = model(collate(svs, None, cfg.model, cpu).inputs)
            got = other.eval()(collate(svs, None, ckpt.config.model, cpu).inputs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="weights do not fit"):
        build_from_checkpoint(tmp_path / "sparse.pt", backend="dense")


def test_engine_sparse_takes_me_for_small_cpu_batches_and_its_kernels_for_large(monkeypatch) -> None:
    from ctsparse.models import sparse

    rng = np.random.default_rng(5)
    svs = [random_sv(rng, (10, 9, 8), 0.3), random_sv(rng, (8, 8, 12), 0.2)]
    n = sum(sv.n_sites for sv in svs)
    cfg, cpu = ModelConfig(backend="sparse"), torch.device("cpu")
    monkeypatch.setattr(sparse, "CPU_KERNEL_MIN_SITES", n + 1)
    assert type(collate(svs, None, cfg, cpu).inputs).__name__ == "SparseTensor"
    monkeypatch.setattr(sparse, "CPU_KERNEL_MIN_SITES", n)
    assert type(collate(svs, None, cfg, cpu).inputs).__name__ == "SiteTensor"
