"""The CLI shell: fast help, doctor, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ctsparse.cli.main import app


def test_help_does_not_import_torch_or_me() -> None:
    code = (
        "import sys; from ctsparse.cli.main import app; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "assert 'train' in r.output and 'predict' in r.output and 'profile' in r.output; "
        "print(sorted(m for m in ('torch', 'MinkowskiEngine', 'scipy', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_doctor_reports_me_and_blas() -> None:
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0, res.output
    assert "MinkowskiEngine" in res.output and "0.5.4" in res.output
    assert "blas" in res.output.lower()


def test_usage_errors_keep_exit_code_2(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["predict", "x.pt", "y.nii.gz", "--out", str(tmp_path / "p.txt")])
    assert res.exit_code == 2


def test_debug_flag_shows_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pt")
    quiet = CliRunner().invoke(app, ["predict", missing, "x.nii.gz"])
    assert quiet.exit_code == 1 and "nope.pt" in quiet.output and quiet.exception is not None
    loud = CliRunner().invoke(app, ["--debug", "predict", missing, "x.nii.gz"])
    assert loud.exit_code != 0
    assert type(loud.exception).__name__ == "CheckpointError"


def test_doctor_fails_with_a_fix_when_me_is_missing() -> None:
    code = (
        "import sys; sys.modules['MinkowskiEngine'] = None; sys.argv = ['ctsparse', 'doctor']; "
        "from ctsparse.cli.main import run; run()"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 1
    assert "MinkowskiEngine" in res.stderr and "scripts/setup.sh" in res.stderr
    assert "Traceback" not in res.stderr
