"""A cross model refuses a MinkowskiEngine without ctsparse's cross-kernel patch, and doctor
says which one is installed.

The unpatched build is not installed here (its compile takes minutes), so its offsets are read
off this ME the way the unpatched one makes them: MinkowskiEngine 0.5.4 as released enumerates a
size-3 HYPER_CROSS as the first 7 offsets of the 3x3x3 cube (ME issue #436). The probe that reads
the installed build's offsets is then replaced by those, and everything downstream is real.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")

import MinkowskiEngine as ME

from ctsparse.cli.main import app
from ctsparse.config import ModelConfig
from ctsparse.errors import CtsparseError
from ctsparse.models import create_model, minkowski

TINY = {"widths": [4, 8], "depths": [1, 1]}


def _unpatched_cross_offsets() -> tuple[tuple[int, int, int], ...]:
    """The first 7 cube offsets in ME's kernel order, read off a real kernel map."""
    import torch

    return minkowski._read_offsets(ME, torch, "HYPER_CUBE")[:7]


@pytest.fixture
def unpatched_me(monkeypatch: pytest.MonkeyPatch) -> tuple[tuple[int, int, int], ...]:
    offsets = _unpatched_cross_offsets()
    assert (0, 0, 0) not in offsets and offsets != minkowski.CROSS_OFFSETS  # the #436 symptom
    monkeypatch.setattr(minkowski, "cross_kernel_offsets", lambda: offsets)
    return offsets


def test_this_build_has_the_patch_and_doctor_says_so() -> None:
    from ctsparse.doctor import check_environment

    (row,) = [c for c in check_environment() if c.name == "ME cross kernel"]
    assert row.ok and row.detail == "centre + 6 face neighbours (ctsparse patch 0002)"
    assert create_model(ModelConfig(kernel="cross", **TINY), 8, 2) is not None  # type: ignore[arg-type]


@pytest.mark.usefixtures("unpatched_me")
def test_a_cross_model_refuses_an_me_without_the_patch() -> None:
    with pytest.raises(CtsparseError) as err:
        create_model(ModelConfig(kernel="cross", **TINY), 8, 2)  # type: ignore[arg-type]
    message = str(err.value)
    assert "model.kernel: cross" in message and "ME issue #436" in message
    assert "scripts/install_me.py" in message and "model.kernel: cube" in message
    assert "(-1, -1, -1)" in message  # names the offsets the installed build uses
    # the cube kernel does not depend on the patch, and the dense twin does not use ME at all
    assert create_model(ModelConfig(kernel="cube", **TINY), 8, 2) is not None  # type: ignore[arg-type]
    assert create_model(ModelConfig(backend="dense", kernel="cross", **TINY), 8, 2) is not None  # type: ignore[arg-type]


def test_doctor_fails_on_an_me_without_the_patch(unpatched_me: tuple[tuple[int, int, int], ...]) -> None:
    from ctsparse.doctor import check_environment

    (row,) = [c for c in check_environment() if c.name == "ME cross kernel"]
    assert not row.ok and "unpatched 0.5.4 cross" in row.detail and str(list(unpatched_me)) in row.detail
    assert "install_me" in row.fix or "setup.sh" in row.fix
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 1
    assert "ME cross kernel" in res.output and "Traceback" not in res.output
