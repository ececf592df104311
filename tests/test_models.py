"""Every engine of the registry, on tiny random sparse inputs (timm-style)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctsparse.collate import collate
from ctsparse.config import ModelConfig
from ctsparse.models import create_model
from ctsparse.models.registry import BUILTIN, available, get_engine
from ctsparse.sparse_volume import SparseVolume

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")


def random_sv(rng: np.random.Generator, shape=(12, 10, 8), channels=1, occupancy=0.3) -> SparseVolume:
    mask = rng.random(shape) < occupancy
    coords = np.ascontiguousarray(np.argwhere(mask), dtype=np.int32)
    feats = rng.standard_normal((len(coords), channels)).astype(np.float32)
    return SparseVolume(coords, feats, shape, np.eye(4), {"features": "hu"}, {}, "random")


@pytest.mark.parametrize("backend", sorted(BUILTIN))
@pytest.mark.parametrize(("kernel", "channels", "widths"), [("cube", 1, [4, 8]), ("cross", 8, [4, 8, 8])])
def test_forward_shapes(backend: str, kernel: str, channels: int, widths: list[int]) -> None:
    rng = np.random.default_rng(0)
    cfg = ModelConfig(backend=backend, widths=widths, depths=[1] * len(widths), kernel=kernel)  # type: ignore[arg-type]
    model = create_model(cfg, channels, 3).eval()
    svs = [random_sv(rng, channels=channels), random_sv(rng, (9, 11, 7), channels)]
    batch = collate(svs, None, cfg, torch.device("cpu"))
    with torch.no_grad():
        logits = model(batch.inputs)
        feats = model.forward_features(batch.inputs)
    assert logits.shape == (2, 3)
    assert feats.shape == (2, 2 * widths[-1])
    assert torch.isfinite(logits).all()


def test_registry_lists_both_backends() -> None:
    assert {"sparse", "dense"} <= set(available())


@pytest.mark.parametrize("backend", sorted(BUILTIN))
def test_every_engine_checks_its_installation(backend: str) -> None:
    checks = get_engine(backend).check()
    assert checks and all(c.ok for c in checks), checks


def test_an_unknown_backend_names_the_known_ones() -> None:
    from ctsparse.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown backend 'conv' \(known: dense, minkowski, sparse"):
        get_engine("conv")


def test_sparse_batch_rows_follow_input_order() -> None:
    """ME's global pooling emits scans in its own order; the model must return them in batch order."""
    rng = np.random.default_rng(1)
    cfg = ModelConfig(widths=[4], depths=[1], dropout=0.0)
    model = create_model(cfg, 1, 2).eval()
    a, b, c = random_sv(rng), random_sv(rng, (6, 6, 6)), random_sv(rng, (14, 5, 9))
    dev = torch.device("cpu")
    with torch.no_grad():
        singles = [model(collate([x], None, cfg, dev).inputs) for x in (a, b, c)]
        together = model(collate([a, b, c], None, cfg, dev).inputs)
    torch.testing.assert_close(together, torch.cat(singles), rtol=1e-4, atol=1e-5)


def test_cross_kernel_dense_twin_keeps_off_cross_weights_inert() -> None:
    cfg = ModelConfig(backend="dense", widths=[4], depths=[1], kernel="cross")
    model = create_model(cfg, 1, 2)
    conv = model.stages[0][0].conv1
    x = torch.zeros(1, 4, 5, 5, 5)
    x[0, :, 1, 1, 1] = 1.0  # a voxel diagonal to the centre: outside the cross
    with torch.no_grad():
        assert float(conv(x)[0, :, 2, 2, 2].abs().sum()) == 0.0
        x[0, :, 1, 1, 1] = 0.0
        x[0, :, 1, 2, 2] = 1.0  # a face neighbour: inside the cross
        assert float(conv(x)[0, :, 2, 2, 2].abs().sum()) > 0.0


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 8])
def test_global_pooling_is_exact_per_scan_forward_and_backward(batch):
    """ME 0.5.4's CPU global pooling mixes scans up (see models/sparse.global_avg_max)."""
    import MinkowskiEngine as ME
    import torch

    from ctsparse.models.sparse import global_avg_max

    rng = np.random.default_rng(batch)
    coords = []
    for b in range(batch):
        pts = np.unique(rng.integers(0, 30, (int(rng.integers(5, 60)), 3)), axis=0)
        coords.append(np.concatenate([np.full((len(pts), 1), b), pts], 1))
    c = torch.from_numpy(np.concatenate(coords).astype(np.int32))
    f = torch.randn(len(c), 4, dtype=torch.float64, requires_grad=True)
    x = ME.SparseTensor(f, coordinates=c)
    avg, mx = global_avg_max(x)
    # the sparse tensor may reorder its rows: compare against its own C/F, scan by scan
    b_idx = x.C[:, 0].long()
    ref_avg = torch.stack([x.F[b_idx == b].mean(0) for b in range(batch)])
    ref_max = torch.stack([x.F[b_idx == b].max(0).values for b in range(batch)])
    torch.testing.assert_close(avg, ref_avg)
    torch.testing.assert_close(mx, ref_max)
    w = torch.randn(batch, 8, dtype=torch.float64)
    (g,) = torch.autograd.grad((torch.cat([avg, mx], 1) * w).sum(), f, retain_graph=True)
    (g_ref,) = torch.autograd.grad((torch.cat([ref_avg, ref_max], 1) * w).sum(), f)
    torch.testing.assert_close(g, g_ref)


def test_input_pooling_is_the_same_for_the_sparse_model_and_its_dense_twin():
    from ctsparse.models.dense import _input_pool, collate_dense
    from ctsparse.models.sparse import collate_sparse, global_avg_max

    rng = np.random.default_rng(0)
    svs = []
    for n in (30, 55, 12):
        coords = np.unique(rng.integers(0, 9, (n, 3)), axis=0).astype(np.int32)
        feats = rng.normal(size=(len(coords), 3)).astype(np.float32)
        svs.append(SparseVolume(coords, feats, (9, 9, 9), np.eye(4), {}))
    avg, mx = global_avg_max(collate_sparse(svs, torch.device("cpu")))
    dense = _input_pool(collate_dense(svs, torch.device("cpu"), multiple=4))
    torch.testing.assert_close(torch.cat([avg, mx], 1), dense, rtol=1e-5, atol=1e-6)
    for backend in ("sparse", "dense"):
        cfg = ModelConfig(backend=backend, widths=[4, 8], depths=[1, 1], input_pooling=True)
        model = create_model(cfg, 3, 2).eval()
        assert model.head.in_features == 2 * 8 + 2 * 3
        out = model(collate(svs, None, cfg, torch.device("cpu")).inputs)
        assert out.shape == (3, 2) and torch.isfinite(out).all()


def test_installed_minkowskiengine_computes_the_cross_kernel_the_model_expects() -> None:
    """scripts/me-patches/0002: centre first, then -1/+1 per axis (0.5.4 as released: 7 offsets of
    the cube's first corner plane, no centre), read off a kernel map of the installed build."""
    from ctsparse.models.minkowski import CROSS_OFFSETS, cross_kernel_offsets

    got = cross_kernel_offsets()
    assert got == CROSS_OFFSETS
    assert got[0] == (0, 0, 0) and sorted(sum(map(abs, o)) for o in got) == [0, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize(
    ("size", "stride", "shape"), [(3, 1, (9, 7, 8)), (2, 2, (8, 6, 10)), (3, 1, (40, 32, 32))]
)
def test_dense_twin_conv_on_onednn_equals_conv3d(size: int, stride: int, shape: tuple[int, int, int]) -> None:
    """The twin's Conv3d calls oneDNN directly on channels-last tensors (the default dispatch sends
    small batch-of-one inputs to slow_conv3d): same values and gradients as F.conv3d."""
    from ctsparse.models.dense import Conv3d, MaskedConv3d

    torch.manual_seed(0)
    convs = [Conv3d(5, 6, size, stride=stride, padding=size // 2 if stride == 1 else 0, bias=False)]
    if stride == 1:
        convs.append(MaskedConv3d(5, 6, size))
    for conv in convs:
        x = torch.randn(1, 5, *shape, requires_grad=True)
        weight = conv.weight * conv.mask if isinstance(conv, MaskedConv3d) else conv.weight
        ref = torch.nn.functional.conv3d(x, weight, None, stride, conv.padding)
        out = conv(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        g = torch.randn_like(ref)
        gx, gw = torch.autograd.grad(out, (x, conv.weight), g)
        rx, rw = torch.autograd.grad(ref, (x, conv.weight), g)
        torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gw, rw, rtol=1e-3, atol=1e-3)


def test_the_cross_kernel_check_keeps_the_thread_count() -> None:
    """Its one-thread coordinate manager must not leave the process (and a cross model's training)
    on one OpenMP thread."""
    import torch

    from ctsparse.models.minkowski import cross_kernel_offsets

    before = torch.get_num_threads()
    cross_kernel_offsets.cache_clear()
    torch.set_num_threads(2)
    try:
        assert cross_kernel_offsets()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", sorted(BUILTIN))
def test_input_pooling_trains_on_a_batch_of_one_scan(backend: str) -> None:
    """An epoch's last batch can hold a single scan; its pooled inputs have no batch statistics."""
    rng = np.random.default_rng(2)
    cfg = ModelConfig(backend=backend, widths=[4, 8], depths=[1, 1], input_pooling=True)
    model = create_model(cfg, 2, 2).train()
    norm = model.input_norm
    before = norm.running_mean.clone()
    batch = collate([random_sv(rng, channels=2)], None, cfg, torch.device("cpu"))
    loss = model(batch.inputs).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(norm.running_mean, before)  # one scan does not move the running statistics
    two = collate([random_sv(rng, channels=2), random_sv(rng, channels=2)], None, cfg, torch.device("cpu"))
    model(two.inputs)
    assert not torch.equal(norm.running_mean, before)  # a real batch does
