"""Settings shared by the tests that aim a signal inside a training epoch."""

from __future__ import annotations

# A finer grid and wider layers than the tiny test runs: a step takes ~25 ms, not ~2, so that a
# signal can be aimed inside an epoch (a 15 ms epoch is shorter than the poll that watches for it).
SLOWER = ["--set", "preprocess.spacing=[3, 3, 4]", "--set", "model.widths=[32, 64]"]
