"""The dense twin's convolution path: PyTorch's default conv3d dispatch vs oneDNN called directly.

    python benchmarks/bench_dense_conv.py [--runs 7] [--threads 1] [--json OUT]

For batch-of-one 3x3x3 convolutions of the sizes the dense twin meets (stems and stages of the
benchmark phantom's 2^3 and 4^3 patch grids), forward and forward+backward, interleaved, medians:
- default: F.conv3d on a contiguous tensor (what nn.Conv3d does);
- oneDNN, contiguous: torch.mkldnn_convolution on the same tensors;
- oneDNN, channels-last: what ctsparse.models.dense.Conv3d does.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ctsparse.benchmark import median_seconds
from ctsparse.device import set_threads

SHAPES = [  # (grid, cin, cout): stem and stage convolutions of the twin on the benchmark phantom
    ((40, 32, 32), 8, 16),
    ((40, 32, 32), 16, 16),
    ((20, 16, 16), 32, 32),
    ((10, 8, 8), 64, 64),
    ((56, 48, 64), 64, 16),
    ((104, 88, 120), 16, 16),
    ((52, 44, 60), 32, 32),
]


def paths(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    xl = x.contiguous(memory_format=torch.channels_last_3d)
    one = (1, 1, 1)
    return {
        "default": lambda: F.conv3d(x, w, padding=1),
        "onednn": lambda: torch.mkldnn_convolution(x, w, None, one, one, one, 1),
        "onednn_channels_last": lambda: torch.mkldnn_convolution(xl, w, None, one, one, one, 1),
    }


def backward_of(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    return lambda: fn().sum().backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    rows = []
    for grid, cin, cout in SHAPES:
        x = torch.randn(1, cin, *grid)
        w = torch.randn(cout, cin, 3, 3, 3, requires_grad=True)
        ways = paths(x, w)
        ref = ways["default"]().detach()
        row: dict[str, Any] = {"grid": "x".join(map(str, grid)), "cin": cin, "cout": cout}
        for name, fn in ways.items():
            torch.testing.assert_close(fn().detach(), ref, rtol=1e-4, atol=1e-3)
            with torch.no_grad():
                row[f"{name}_forward_ms"] = 1e3 * median_seconds(fn, args.runs)
            row[f"{name}_forward_backward_ms"] = 1e3 * median_seconds(backward_of(fn), max(3, args.runs // 2))
        rows.append(row)
        fwd = " / ".join(f"{row[f'{n}_forward_ms']:.1f}" for n in ways)
        both = " / ".join(f"{row[f'{n}_forward_backward_ms']:.1f}" for n in ways)
        print(f"{row['grid']:>12} {cin:>3}->{cout:<3} default / oneDNN / oneDNN channels-last: "
              f"forward {fwd} ms, forward+backward {both} ms")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "runs": args.runs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
