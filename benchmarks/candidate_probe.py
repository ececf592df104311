"""How much can one classifier per candidate ball give, outside the product's network?

A probe with a small dense 3D CNN in plain torch, so that the question is the supervision and the
input grid, not the sparse engine. For every scan of a phantom folder it takes the 32 candidate
balls the planner's candidate stage would keep (greedy blob maxima 12 mm apart, on the lung
region at 2.5 mm, threshold -700 HU), cuts a 10^3 cube of 2.5 mm voxels (HU, blob filter, kept
mask) around each maximum and zeroes it outside the 12 mm ball. A ball is positive when its
maximum lies within the nodule's radius + 2.5 mm (findings.csv). The CNN is trained either per
ball (`--supervision ball`: positives oversampled 1:3) or from scan labels only (`--supervision
scan`: multiple-instance learning, the scan's logit is the maximum over its balls). A test scan
scores the maximum over its balls; the script prints the test AUROC after every epoch, beside the
per-scan maximum of the blob channel. `--grid 5` hands the CNN the same ball as 2^3 patches of a
5 mm grid (space-to-depth), as the planned sparse model sees it. `--submanifold` zeroes every
activation off the kept sites after each ReLU (and off the cells holding one after each pooling),
which is what a sparse network computes; `--no-blob` zeroes the blob channel; `--network sparse`
(or `dense`) trains ctsparse's own network (or its dense twin) on the kept voxels of the balls;
`--trunk residual` gives the probe ctsparse's topology (a stem, residual stages, strided
downsampling) and `--encoding product` ctsparse's input normalisation.

    python benchmarks/candidate_probe.py TRAIN_DIR TEST_DIR --work /tmp/probe [--grid 5]
        [--submanifold] [--no-blob] [--trunk residual] [--encoding product] [--network sparse|dense]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from ctsparse.config import load_config
from ctsparse.io import read_volume
from ctsparse.sparsify import candidate_balls, sparsify

SETTINGS = [
    "preprocess.spacing=[2.5, 2.5, 2.5]",
    "preprocess.region=lungs",
    "preprocess.threshold=-700",
    "preprocess.blob_channel=true",
    "preprocess.features=hu",
    "preprocess.hu_center=-400",
    "preprocess.hu_scale=500",
]
BALLS, BALL_MM, HALF = 32, 12.0, 5  # a 10^3 crop of 2.5 mm voxels holds the 12 mm ball


def _crops(job: tuple[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
    path, finding = job
    pc = load_config(None, SETTINGS).preprocess
    sv = sparsify(read_volume(path), dataclasses.replace(pc, blob_candidates=0))
    grid = np.array(sv.grid_shape) + 2 * HALF
    dense = np.zeros((3, *grid), np.float32)
    c = sv.coords + HALF
    dense[0][tuple(c.T)] = sv.feats[:, 0] + 1.2  # -1000 HU (air) near 0
    dense[1][tuple(c.T)] = sv.feats[:, -1]
    dense[2][tuple(c.T)] = 1.0
    ball = (np.indices((2 * HALF,) * 3) - HALF + 0.5) ** 2
    inside = ball.sum(0) <= (BALL_MM / 2.5) ** 2
    world = (sv.affine[:3, :3] @ sv.coords.T).T + sv.affine[:3, 3]
    crops, labels = [], []
    for rows in candidate_balls(sv.coords, sv.feats[:, -1], sv.spacing, BALLS, BALL_MM):
        lo = c[rows[0]] - HALF
        crop = dense[:, lo[0] : lo[0] + 2 * HALF, lo[1] : lo[1] + 2 * HALF, lo[2] : lo[2] + 2 * HALF]
        crops.append(crop * inside)
        hit = finding is not None and np.linalg.norm(world[rows[0]] - finding[:3]) <= finding[3] + 2.5
        labels.append(int(hit))
    while len(crops) < BALLS:
        crops.append(crops[0])
        labels.append(labels[0])
    return np.stack(crops).astype(np.float16), np.array(labels), float(sv.feats[:, -1].max())


def extract(folder: Path, out: Path) -> dict[str, np.ndarray]:
    if out.exists():
        return dict(np.load(out))
    with open(folder / "findings.csv", newline="") as fh:
        found = {
            r["path"]: np.array([float(r[k]) for k in ("x_mm", "y_mm", "z_mm", "radius_mm")])
            for r in csv.DictReader(fh)
        }
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with Pool(2) as pool:
        res = pool.map(_crops, [(str(folder / r["path"]), found.get(r["path"])) for r in rows], chunksize=4)
    data = {
        "X": np.stack([r[0] for r in res]),
        "balls": np.stack([r[1] for r in res]),
        "blob_max": np.array([r[2] for r in res]),
        "y": np.array([r["label"] != "normal" for r in rows], dtype=np.int64),
    }
    np.savez(out, **data)
    return data


def _block(cin: int, cout: int) -> nn.Sequential:
    def conv(i: int) -> list[nn.Module]:
        return [nn.Conv3d(i, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*conv(cin), *conv(cout))


def _cbr(cin: int, cout: int, size: int = 3, stride: int = 1) -> nn.Sequential:
    pad = size // 2 if stride == 1 else 0
    conv = nn.Conv3d(cin, cout, size, stride=stride, padding=pad, bias=False)
    return nn.Sequential(conv, nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = (
            _cbr(c, c),
            nn.Sequential(nn.Conv3d(c, c, 3, padding=1, bias=False), nn.BatchNorm3d(c)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(self.a(x)) + x)


class Probe(nn.Module):
    def __init__(self, grid: int, submanifold: bool = False, trunk: str = "plain") -> None:
        super().__init__()
        self.grid, self.submanifold = grid, submanifold
        body: list[nn.Module]
        if grid == 5:
            body = [_block(24, 32), _block(32, 64)]
        elif trunk == "residual":  # ctsparse's topology: a stem, residual stages, strided downsampling
            body = [
                _cbr(3, 16),
                _Residual(16),
                _cbr(16, 32, 2, 2),
                _Residual(32),
                _cbr(32, 64, 2, 2),
                _Residual(64),
            ]
        else:
            body = [_block(3, 16), nn.MaxPool3d(2), _block(16, 32), nn.MaxPool3d(2), _block(32, 64)]
        self.body = nn.Sequential(*body)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = (x[:, 2:3] > 0).to(x.dtype)  # the kept-site mask
        if self.grid == 5:  # 2^3 patches of 2.5 mm voxels as channels of a 5 mm grid
            b, c, n = x.shape[0], x.shape[1], x.shape[2] // 2
            x = x.reshape(b, c, n, 2, n, 2, n, 2).permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, 8 * c, n, n, n)
            active = nn.functional.max_pool3d(active, 2)
        for layer in (
            leaf for part in self.body for leaf in (part if isinstance(part, nn.Sequential) else [part])
        ):
            x = layer(x)
            if isinstance(layer, nn.MaxPool3d):
                active = layer(active)
            if self.submanifold and isinstance(layer, nn.ReLU):
                # as a sparse network computes: features only on the kept sites (and, after each
                # pooling, on the cells that hold one)
                x = x * active
        return self.head(x.amax(dim=(2, 3, 4))).squeeze(1)


class Product(nn.Module):
    """ctsparse's network on the kept voxels of each 10^3 crop (2.5 mm sites), answering with the
    log-odds of its second class. Features per site: the HU as ctsparse normalises the lung region,
    (HU + 400) / 500, and the blob channel (encoding "product"); or the probe's HU with air at 0,
    the blob channel and a constant 1 that marks a kept site (encoding "probe")."""

    def __init__(self, backend: str, encoding: str) -> None:
        super().__init__()
        from ctsparse.config import ModelConfig
        from ctsparse.models.registry import create_model, get_engine

        self.cfg = ModelConfig(
            backend=backend,
            widths=[16, 32, 64],
            depths=[1, 1, 1],
            kernel="cube",
            input_pooling=False,
            dropout=0.2,
        )
        self.encoding = encoding
        channels = 3 if encoding == "probe" else 2
        self.net, self.engine = create_model(self.cfg, channels, 2), get_engine(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ctsparse.sparse_volume import SparseVolume

        svs = []
        for crop in x.numpy():
            kept = crop[2] > 0
            if self.encoding == "probe":
                feats = np.stack([crop[0][kept], crop[1][kept], crop[2][kept]], axis=1)
            else:
                feats = np.stack([crop[0][kept] - 1.2, crop[1][kept]], axis=1)
            coords = np.argwhere(kept).astype(np.int32)
            svs.append(SparseVolume(coords, feats.astype(np.float32), kept.shape, np.eye(4), {}))
        z = self.net(self.engine.collate(svs, torch.device("cpu"), self.engine.stride_multiple(self.cfg)))
        return z[:, 1] - z[:, 0]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    for axis in (2, 3, 4):
        if torch.rand(1, generator=g) < 0.5:
            x = x.flip(axis)
    x = torch.rot90(x, int(torch.randint(0, 4, (1,), generator=g)), (2, 3))
    return x.transpose(2, 3) if torch.rand(1, generator=g) < 0.5 else x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train", type=Path)
    ap.add_argument("test", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--grid", type=float, choices=[2.5, 5], default=2.5)
    ap.add_argument("--supervision", choices=["ball", "scan"], default="ball")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--submanifold",
        action="store_true",
        help="zero every activation off the kept sites, as a sparse network does",
    )
    ap.add_argument("--no-blob", action="store_true", help="zero the blob channel: HU and the kept mask only")
    ap.add_argument(
        "--trunk", choices=["plain", "residual"], default="plain", help="the probe's trunk (2.5 mm)"
    )
    ap.add_argument(
        "--encoding",
        choices=["probe", "product"],
        default="probe",
        help="probe: HU with air at 0 and the kept mask as a channel; product: (HU + 400) / 500 on "
        "the kept voxels and 0 elsewhere, no mask, as ctsparse normalises the lung region",
    )
    ap.add_argument(
        "--network",
        choices=["probe", "sparse", "dense"],
        default="probe",
        help="sparse / dense: ctsparse's own network (engine sparse or its dense twin; three stages of "
        "16, 32, 64, the cube kernel) on the kept voxels of each ball, trained the same way",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.network != "probe" and (args.submanifold or args.trunk != "plain"):
        ap.error("--network has its own trunk: no --submanifold or --trunk")
    if args.submanifold and args.trunk != "plain":
        ap.error("--submanifold masks the plain trunk only")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    tr = extract(args.train, args.work / f"{args.train.name}.npz")
    te = extract(args.test, args.work / f"{args.test.name}.npz")
    shape = (-1, 3, 2 * HALF, 2 * HALF, 2 * HALF)
    x_tr = torch.from_numpy(tr["X"].reshape(shape).astype(np.float32))
    b_tr = torch.from_numpy(tr["balls"].reshape(-1).astype(np.float32))
    y_tr = torch.from_numpy(tr["y"].astype(np.float32))
    x_te = torch.from_numpy(te["X"].reshape(shape).astype(np.float32))
    if args.no_blob:
        x_tr[:, 1] = 0.0
        x_te[:, 1] = 0.0
    if args.encoding == "product" and args.network == "probe":  # (HU + 400) / 500 on kept voxels, no mask
        for x in (x_tr, x_te):
            x[:, 0] = (x[:, 0] - 1.2) * (x[:, 2] > 0)
            x[:, 2] = 0.0
    print(f"blob-channel maximum per scan: test AUROC {roc_auc_score(te['y'], te['blob_max']):.4f}")
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model: nn.Module = Probe(int(args.grid), args.submanifold, args.trunk)
    if args.network != "probe":
        model = Product(args.network, args.encoding)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=args.epochs * args.steps)
    pos, neg = torch.nonzero(b_tr > 0).squeeze(1), torch.nonzero(b_tr == 0).squeeze(1)
    bce = nn.functional.binary_cross_entropy_with_logits
    for epoch in range(args.epochs):
        model.train()
        t0, total = time.perf_counter(), 0.0
        for _ in range(args.steps):
            if args.supervision == "ball":
                idx = torch.cat([pos[torch.randint(0, len(pos), (16,), generator=g)],
                                 neg[torch.randint(0, len(neg), (48,), generator=g)]])  # fmt: skip
                loss = bce(model(_augment(x_tr[idx], g)), b_tr[idx])
            else:
                scans = torch.randint(0, len(y_tr), (4,), generator=g)
                idx = (scans[:, None] * BALLS + torch.arange(BALLS)[None]).reshape(-1)
                loss = bce(model(_augment(x_tr[idx], g)).reshape(4, BALLS).max(1).values, y_tr[scans])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        model.eval()
        with torch.no_grad():
            scores = torch.cat([model(x_te[i : i + 512]) for i in range(0, len(x_te), 512)])
        scan = scores.reshape(len(te["y"]), BALLS).max(1).values.numpy()
        auroc = roc_auc_score(te["y"], scan)
        took = time.perf_counter() - t0
        print(f"epoch {epoch + 1}  loss {total / args.steps:.4f}  test AUROC {auroc:.4f}  {took:.0f} s")


if __name__ == "__main__":
    main()
