"""Labelled dataset discovery and splitting.

Three layouts, tried in this order:
  1. DATA/labels.csv with columns path,label[,split] (paths relative to DATA or absolute);
  2. DATA/*.json, a MONAI/Decathlon-style datalist: {"training": [{"image": ..., "label": ...}],
     "validation": [...]}, where label is a class name or an integer index into "labels"
     (a list or {"0": "normal", ...}) when present;
  3. class subfolders DATA/<class>/<scan>, a scan being a NIfTI file or a DICOM series folder.
A datalist or CSV may also be passed directly as DATA.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ctsparse.errors import DatasetError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test", "": ""}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    split: str = ""  # "", "train", "val" or "test"


def _norm_split(value: str, where: Path) -> str:
    v = _SPLIT_ALIASES.get(value.strip().lower(), value.strip().lower())
    if v not in ("", *SPLITS):
        raise DatasetError(where, f"unknown split '{value}' (expected train, val or test)")
    return v


def _resolve(base: Path, rel: str, where: Path) -> Path:
    p = Path(rel)
    p = p if p.is_absolute() else base / p
    if not p.exists():
        raise DatasetError(where, f"listed scan does not exist: {rel}")
    return p


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV's column names and rows, names lower-cased and values stripped; DatasetError if it
    cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(path, f"cannot read CSV: {exc}") from exc
    return fields, rows


def read_labels_csv(path: Path) -> list[Sample]:
    fields, rows = _read_csv(path)
    if "path" not in fields or "label" not in fields:
        raise DatasetError(path, f"needs columns path,label[,split]; found {', '.join(fields) or 'none'}")
    out = []
    for i, r in enumerate(rows, start=2):
        if not r.get("path"):
            continue
        if not r.get("label"):
            raise DatasetError(path, f"line {i}: empty label for {r['path']}")
        out.append(
            Sample(_resolve(path.parent, r["path"], path), r["label"], _norm_split(r.get("split", ""), path))
        )
    return out


def read_datalist(path: Path) -> list[Sample]:
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(path, f"cannot read datalist JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DatasetError(path, "datalist must be a JSON object with a 'training' list")
    names = data.get("labels")
    out = []
    for key in ("training", "validation", "test", "testing"):
        for i, item in enumerate(data.get(key, []) or []):
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise DatasetError(path, f"{key}[{i}] needs 'image' and 'label'")
            label = item["label"]
            if isinstance(label, list) and len(label) == 1:
                label = label[0]
            if isinstance(label, int) and names is not None:
                label = names[label] if isinstance(names, list) else names.get(str(label), label)
            image = item["image"][0] if isinstance(item["image"], list) else item["image"]
            split = _norm_split(str(item.get("split", key)), path)
            out.append(Sample(_resolve(path.parent, str(image), path), str(label), split))
    if not out:
        raise DatasetError(path, "datalist has no 'training' entries")
    return out


def read_class_folders(root: Path) -> list[Sample]:
    from ctsparse.io.discover import find_scans

    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out += [Sample(scan, sub.name) for scan in find_scans(sub)]
    return out


def discover_dataset(data: str | Path) -> list[Sample]:
    """Labelled scans of a dataset folder (or a labels CSV / datalist JSON given directly)."""
    root = Path(data)
    if not root.exists():
        raise DatasetError(root, "dataset path does not exist")
    if root.is_file():
        samples = read_datalist(root) if root.suffix.lower() == ".json" else read_labels_csv(root)
    elif (root / "labels.csv").is_file():
        samples = read_labels_csv(root / "labels.csv")
    elif datalists := sorted(root.glob("*.json")):
        samples = read_datalist(datalists[0])
    else:
        samples = read_class_folders(root)
    if not samples:
        raise DatasetError(
            root, "no labelled scans found (expected labels.csv, a datalist JSON or class subfolders)"
        )
    if len({s.label for s in samples}) < 2:
        raise DatasetError(root, f"need at least two classes, found only '{samples[0].label}'")
    return samples


def stratified_split(
    samples: list[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """(train, val). Explicit split columns win; otherwise a seeded split that keeps class ratios
    and puts at least one scan of every class with >= 2 scans into validation."""
    if any(s.split for s in samples):
        return [s for s in samples if s.split in ("train", "")], [s for s in samples if s.split == "val"]
    if val_fraction <= 0:
        return list(samples), []
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted({s.label for s in samples}):
        group = [s for s in samples if s.label == label]
        order = rng.permutation(len(group))
        n_val = min(len(group) - 1, max(1, round(val_fraction * len(group)))) if len(group) > 1 else 0
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return train, val


FINDINGS_CSV = "findings.csv"


def findings_file(data: str | Path) -> Path | None:
    """DATA/findings.csv (beside the labels CSV or datalist when DATA is a file), if present."""
    root = Path(data)
    path = (root.parent if root.is_file() else root) / FINDINGS_CSV
    return path if path.is_file() else None


def read_findings(data: str | Path) -> dict[Path, npt.NDArray[np.float64]]:
    """Finding positions per scan from DATA/findings.csv: {resolved scan path: (F, 4) rows of
    x, y, z (mm, RAS+ world coordinates as ctsparse reads the scan, like a NIfTI affine's) and
    radius (mm)}. Columns: path, x_mm, y_mm, z_mm and radius_mm or diameter_mm; optionally frame,
    RAS (the default when absent or empty) or LPS for the DICOM/ITK world coordinates that LUNA16's
    annotations and MetaImage offsets use (x and y are negated); any others (e.g. finding) are
    ignored. Empty without the file."""
    path = findings_file(data)
    if path is None:
        return {}
    fields, rows = _read_csv(path)
    size = "radius_mm" if "radius_mm" in fields else "diameter_mm"
    missing = [c for c in ("path", "x_mm", "y_mm", "z_mm", size) if c not in fields]
    if missing:
        raise DatasetError(path, f"needs columns path,x_mm,y_mm,z_mm,radius_mm; missing {', '.join(missing)}")
    out: dict[Path, list[list[float]]] = {}
    for i, r in enumerate(rows, start=2):
        if not r.get("path"):
            continue
        try:
            x, y, z, s = (float(r[c]) for c in ("x_mm", "y_mm", "z_mm", size))
        except ValueError:
            raise DatasetError(path, f"line {i}: x_mm, y_mm, z_mm and {size} must be numbers") from None
        radius = s / 2 if size == "diameter_mm" else s
        frame = (r.get("frame") or "RAS").strip().upper()
        if frame not in ("RAS", "LPS"):
            raise DatasetError(path, f"line {i}: frame {r.get('frame')!r} is neither RAS nor LPS")
        if frame == "LPS":
            x, y = -x, -y
        if not np.isfinite([x, y, z, radius]).all() or radius <= 0:
            raise DatasetError(path, f"line {i}: needs finite coordinates and a positive size")
        scan = _resolve(path.parent, r["path"], path).resolve()
        out.setdefault(scan, []).append([x, y, z, radius])
    return {k: np.array(v, dtype=np.float64) for k, v in out.items()}
