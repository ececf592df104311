"""Starting a run in a folder: refused over an existing run unless asked, then only its files go."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctsparse.errors import CtsparseError
from ctsparse.training.run_folder import RUN_FILES, clear_run, holds_run


def test_a_folder_without_a_run_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    clear_run(tmp_path, overwrite=False)
    assert not holds_run(tmp_path) and (tmp_path / "notes.txt").read_text() == "mine"


def test_an_existing_run_needs_overwrite_and_only_its_files_go(tmp_path: Path) -> None:
    for name in ("history.csv", "last.pt", "plan.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    with pytest.raises(CtsparseError, match=r"already holds a run.*--overwrite"):
        clear_run(tmp_path, overwrite=False)
    assert (tmp_path / "last.pt").exists()
    clear_run(tmp_path, overwrite=True, also=["plan.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert "best.pt" in RUN_FILES and not holds_run(tmp_path)
