"""Where a sparse CPU convolution spends its time, layer by layer: MinkowskiEngine, ctsparse's
own kernels and the dense twin.

    python benchmarks/profile_conv.py [--spacings 2,1.4] [--runs 5] [--threads 1] [--json OUT]

For the benchmark's default phantom (`ctsparse benchmark`'s resolution sweep: the same patient
rendered at each spacing, configs/phantom.yaml preprocessing at the bone threshold of 200 HU) this
runs the sparse model (on MinkowskiEngine) and its dense twin once, captures the input of the first
3x3x3 convolution of every stage, and then times that one layer in isolation, all in one process,
interleaved, medians of --runs:

- ME kernel map: building the layer's kernel map on a fresh coordinate manager (what every new
  scan pays; the model builds one per stage and reuses it in the stage's other convolutions);
- ME conv: MinkowskiConvolution forward with the kernel map cached;
- same maps, torch: the same arithmetic on ME's own kernel map in torch ops, per kernel offset
  (index_select -> mm -> index_add_), to separate ME's CPU kernel (a serial per-row gather, one GEMM
  per offset, a serial per-row scatter-add) from the work itself; checked equal to ME's output;
- im2col GEMM: the same map as a (sites, offsets) neighbour table, every output's neighbours
  gathered into one (sites, offsets x channels) matrix and one GEMM (what an implicit-GEMM kernel
  does, here in torch): what a better CPU kernel could gain on the same kernel map;
- grid lookup map: the same kernel map computed with a dense int32 lookup grid in torch (vectorised,
  no hashing), checked equal as a set of pairs to ME's map;
- ctsparse map / ctsparse conv: what engine `sparse` runs on the CPU (models/siteconv.py) on the
  same layer and weights: its kernel map (a lookup grid, in ctsparse/models/sitemaps.py) and its
  convolution with the map built; checked equal to ME's output;
- dense conv: the dense twin's Conv3d on the same stage's grid (zero-filled), and the ideal
  sparse time occupancy x dense. For the cross kernel the twin runs a 3x3x3 Conv3d with the
  weights outside the cross masked; the same convolution as three 1-D convolutions (9 taps
  instead of 27) is timed beside it, to show whether the twin could be faster;

Nothing here changes the model: it shows which part of the sparse path is the wall, and what would
get past it. Raw rows go to --json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import MinkowskiEngine as ME
import numpy as np
import torch

from ctsparse.benchmark import median_seconds
from ctsparse.benchmark_sweep import phantom_at, threshold_cases
from ctsparse.config import load_config
from ctsparse.device import limit_blas_threads, set_threads
from ctsparse.models import create_model
from ctsparse.models.dense import collate_dense, stride_multiple
from ctsparse.models.minkowski import CROSS_OFFSETS
from ctsparse.models.siteconv import SiteTensor, site_conv
from ctsparse.models.sitemaps import SiteSet
from ctsparse.models.sparse import collate_minkowski

BONE_HU = 200.0


def first_stage_convs(model: torch.nn.Module, x: Any, kind: type) -> list[tuple[torch.nn.Module, Any]]:
    """(layer, input) of the first stride-1 kernel-3 convolution at every resolution."""
    seen: dict[Any, tuple[torch.nn.Module, Any]] = {}

    def hook(m: torch.nn.Module, args: tuple[Any, ...]) -> None:
        inp = args[0]
        if kind is ME.MinkowskiConvolution:
            if m.kernel_generator.kernel_stride[0] != 1 or m.kernel_generator.kernel_size[0] != 3:
                return
            key = inp.tensor_stride[0]
        else:
            if m.stride[0] != 1 or m.kernel_size[0] != 3:
                return
            key = tuple(inp.shape[2:])
        seen.setdefault(key, (m, inp))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, kind)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return list(seen.values())


def torch_conv(
    feats: torch.Tensor, weight: torch.Tensor, maps: dict[int, torch.Tensor], n_out: int
) -> torch.Tensor:
    out = feats.new_zeros(n_out, weight.shape[2])
    for k, io in maps.items():
        i, o = io[0].long(), io[1].long()
        out.index_add_(0, o, feats.index_select(0, i) @ weight[k])
    return out


def neighbour_table(maps: dict[int, torch.Tensor], n_out: int, n_in: int, volume: int) -> torch.Tensor:
    """(n_out, volume) input row per output and offset, n_in (a zero row) where there is none."""
    table = torch.full((n_out, volume), n_in, dtype=torch.int64)
    for k, io in maps.items():
        table[io[1].long(), k] = io[0].long()
    return table


def im2col_conv(feats: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The same convolution as one GEMM: gather every output's neighbours into (n_out, volume * cin)
    and multiply by the (volume * cin, cout) kernel; no scatter-add."""
    padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
    cols = padded[table].reshape(table.shape[0], -1)
    return cols @ weight.reshape(-1, weight.shape[2])


def grid_kernel_map(
    coords: torch.Tensor, stride: int, offsets: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stride-1 kernel map of `coords` (N, 4: batch, x, y, z at tensor stride `stride`) by a dense
    lookup grid: one vectorised gather per offset, no hashing."""
    c = coords[:, 1:].long() // stride
    lo = c.min(0).values - 1
    c = c - lo
    shape = (c.max(0).values + 2).tolist()
    lut = torch.full(shape, -1, dtype=torch.int64)
    n = c.shape[0]
    lut[c[:, 0], c[:, 1], c[:, 2]] = torch.arange(n)
    out = []
    for off in offsets.long():
        nb = c + off
        j = lut[nb[:, 0], nb[:, 1], nb[:, 2]]
        keep = j >= 0
        out.append((j[keep], torch.arange(n)[keep]))
    return out


def profile_layer(sm: Any, sx: Any, dm: torch.nn.Conv3d, dx: torch.Tensor, runs: int) -> dict[str, Any]:
    stride = sx.tensor_stride[0]
    kg = sm.kernel_generator
    coords, feats = sx.C, sx.F

    def fresh() -> Any:
        manager = ME.CoordinateManager(D=3, num_threads=torch.get_num_threads())
        return ME.SparseTensor(feats, coordinates=coords, tensor_stride=stride, coordinate_manager=manager)

    def first_conv() -> None:
        x = fresh()
        with torch.no_grad():
            sm(x)

    def build_only() -> None:
        fresh()

    cached = fresh()
    with torch.no_grad():
        ref = sm(cached).F
    maps = cached.coordinate_manager.kernel_map(
        cached.coordinate_map_key, cached.coordinate_map_key, stride=1, kernel_size=3,
        region_type=kg.region_type,
    )  # fmt: skip
    weight = sm.kernel.detach()
    mine = torch_conv(feats, weight, maps, feats.shape[0])
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
    table = neighbour_table(maps, feats.shape[0], feats.shape[0], weight.shape[0])
    torch.testing.assert_close(im2col_conv(feats, weight, table), ref, rtol=1e-4, atol=1e-4)
    if kg.region_type == ME.RegionType.HYPER_CROSS:
        masked = dm.weight * dm.mask
        torch.testing.assert_close(
            factorised_cross(dx, masked),
            torch.nn.functional.conv3d(dx, masked, padding=1),
            rtol=1e-4,
            atol=1e-4,
        )
    # the same kernel map from a lookup grid: same (in, out) pairs per offset as ME's
    offs = region_offsets(kg.region_type)
    lut_maps = grid_kernel_map(coords, stride, offs)
    n_pairs = sum(int(v.shape[1]) for v in maps.values())
    assert sum(int(i.numel()) for i, _ in lut_maps) == n_pairs, "lookup-grid map differs from ME's"

    # ctsparse's CPU kernels on the same layer: the same weights on a SiteSet of the same sites
    # (coordinates in units of the stride), map built on first use; checked equal to ME's output
    stage_coords = torch.cat([coords[:, :1], coords[:, 1:] // stride], 1).int()
    cached_sites = SiteSet(stage_coords)
    cross = kg.region_type == ME.RegionType.HYPER_CROSS

    def ours(sites: SiteSet) -> torch.Tensor:
        return site_conv(SiteTensor(feats, sites), sm.kernel, 3, 1, cross).F

    with torch.no_grad():
        torch.testing.assert_close(ours(cached_sites), ref, rtol=1e-4, atol=1e-4)
        t_build = median_seconds(build_only, runs)
        t_first = median_seconds(first_conv, runs)
        t_me = median_seconds(lambda: sm(cached), runs)
        t_torch = median_seconds(lambda: torch_conv(feats, weight, maps, feats.shape[0]), runs)
        t_im2col = median_seconds(lambda: im2col_conv(feats, weight, table), runs)
        t_lut = median_seconds(lambda: grid_kernel_map(coords, stride, offs), runs)
        t_ours_first = median_seconds(lambda: ours(SiteSet(stage_coords)), runs)
        t_ours = median_seconds(lambda: ours(cached_sites), runs)
        t_dense = median_seconds(lambda: dm(dx), runs)
        t_factorised = (
            median_seconds(lambda: factorised_cross(dx, dm.weight), runs)
            if kg.region_type == ME.RegionType.HYPER_CROSS
            else None
        )
    occupancy = feats.shape[0] / float(np.prod(dx.shape[2:]))
    return {
        "tensor_stride": stride,
        "kernel": "cross" if kg.region_type == ME.RegionType.HYPER_CROSS else "cube",
        "sites": int(feats.shape[0]),
        "channels": [int(weight.shape[1]), int(weight.shape[2])],
        "dense_grid": "x".join(map(str, dx.shape[2:])),
        "occupancy": occupancy,
        "kernel_map_pairs": n_pairs,
        "me_kernel_map_s": max(0.0, t_first - t_build - t_me),
        "me_conv_cached_s": t_me,
        "torch_conv_on_me_map_s": t_torch,
        "torch_im2col_gemm_on_me_map_s": t_im2col,
        "grid_lookup_kernel_map_s": t_lut,
        "ctsparse_kernel_map_s": max(0.0, t_ours_first - t_ours),
        "ctsparse_conv_s": t_ours,
        "dense_conv_s": t_dense,
        "dense_cross_as_three_1d_convs_s": t_factorised,
        "ideal_s": occupancy * t_dense,
        # cost of one (input site, output site) pair of the sparse conv vs one weight tap of the
        # dense conv at one voxel (27 taps: the cross twin is a masked 3x3x3 conv)
        "me_conv_ns_per_pair": 1e9 * t_me / n_pairs,
        "ctsparse_conv_ns_per_pair": 1e9 * t_ours / n_pairs,
        "dense_conv_ns_per_tap": 1e9 * t_dense / (27 * float(np.prod(dx.shape[2:]))),
    }


def factorised_cross(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The dense cross convolution as three 1-D convolutions (3x1x1, then 1x3x1 and 1x1x3 without
    the centre): 9 weight taps instead of the masked 3x3x3's 27. Checked equal to the masked conv."""
    f = torch.nn.functional
    out = f.conv3d(x, w[:, :, :, 1:2, 1:2], padding=(1, 0, 0))
    out += f.conv3d(x, w[:, :, 1:2, 0::2, 1:2], padding=(0, 1, 0), dilation=(1, 2, 1))
    out += f.conv3d(x, w[:, :, 1:2, 1:2, 0::2], padding=(0, 0, 1), dilation=(1, 1, 2))
    return out


def region_offsets(region_type: Any) -> torch.Tensor:
    """The offsets of a size-3 cube or cross in voxel units."""
    if region_type == ME.RegionType.HYPER_CROSS:
        return torch.tensor(CROSS_OFFSETS)
    r = torch.arange(-1, 2)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3).flip(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/phantom.yaml")
    ap.add_argument("--spacings", default="2,1.4")
    ap.add_argument("--kernels", default="cube,cross")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="OpenBLAS pool size (default: what ctsparse sets, device.blas_threads)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    set_threads(args.threads)  # torch, ME's OpenMP and the BLAS behind ME's convolutions
    if args.blas_threads is not None:
        limit_blas_threads(args.blas_threads)
    cfg = load_config(args.config)
    rows = []
    for s in (float(v) for v in args.spacings.split(",")):
        vol = phantom_at(s)
        [(_, sv)] = threshold_cases(vol, replace(cfg.preprocess, spacing=None), [BONE_HU])
        for kernel in args.kernels.split(","):
            mcfg = replace(cfg.model, kernel=kernel)
            torch.manual_seed(0)
            smodel = create_model(replace(mcfg, backend="sparse"), sv.n_channels, 2).eval()
            dmodel = create_model(replace(mcfg, backend="dense"), sv.n_channels, 2).eval()
            multiple = stride_multiple(mcfg)
            dev = torch.device("cpu")
            sconvs = first_stage_convs(smodel, collate_minkowski([sv], dev), ME.MinkowskiConvolution)
            dconvs = first_stage_convs(dmodel, collate_dense([sv], dev, multiple), torch.nn.Conv3d)
            for (sm, sx), (dm, dx) in zip(sconvs, dconvs, strict=True):
                row = {"spacing_mm": s, **profile_layer(sm, sx, dm, dx, args.runs)}
                rows.append(row)
                print(
                    f"{s:>4g} mm {row['kernel']:>5} stride {row['tensor_stride']}: {row['sites']:>7} sites "
                    f"({100 * row['occupancy']:.1f} %), {row['channels'][0]}->{row['channels'][1]} ch | "
                    f"ME map {1e3 * row['me_kernel_map_s']:.1f} ms, "
                    f"ME conv {1e3 * row['me_conv_cached_s']:.1f} ms, "
                    f"torch on ME map {1e3 * row['torch_conv_on_me_map_s']:.1f} ms, "
                    f"im2col GEMM {1e3 * row['torch_im2col_gemm_on_me_map_s']:.1f} ms, "
                    f"grid map {1e3 * row['grid_lookup_kernel_map_s']:.1f} ms | ctsparse map "
                    f"{1e3 * row['ctsparse_kernel_map_s']:.1f} ms, "
                    f"conv {1e3 * row['ctsparse_conv_s']:.1f} ms | dense "
                    f"{1e3 * row['dense_conv_s']:.1f} ms, ideal {1e3 * row['ideal_s']:.1f} ms"
                    + (
                        f", as 3 1-D convs {1e3 * row['dense_cross_as_three_1d_convs_s']:.1f} ms"
                        if row["dense_cross_as_three_1d_convs_s"] is not None
                        else ""
                    )
                    + f" | ns per pair ME {row['me_conv_ns_per_pair']:.1f}, per dense tap "
                    f"{row['dense_conv_ns_per_tap']:.2f}",
                    flush=True,
                )
    if args.json:
        meta = {"threads": args.threads, "blas_threads": args.blas_threads or args.threads, "runs": args.runs}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
