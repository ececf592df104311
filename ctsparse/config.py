"""One typed config: nested dataclasses loaded from configs/*.yaml, overridden with --set a.b=v.

Unknown keys and values of the wrong type are errors that name the key. Every checkpoint carries
the resolved config, so predict preprocesses exactly as training did.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from ctsparse.errors import ConfigError
from ctsparse.models.registry import available


@dataclass
class PreprocessConfig:
    # None keeps the native grid. Resampling to a common spacing makes a model see the same
    # anatomy at the same size whatever the scanner's pixel spacing and slice interval were.
    spacing: list[float] | None = None
    # HU clip applied to the features: air below -1000 and metal above ~3000 carry no signal for
    # classification but would dominate a linear normalization.
    window: list[float] | None = field(default_factory=lambda: [-1000.0, 1000.0])
    # Keep voxels >= threshold. -500 HU separates body (fat ~ -100, lung parenchyma ~ -850 is
    # dropped only inside the lungs' air) from room air (-1000) robustly across scanners.
    threshold: float = -500.0
    # Upper bound of a HU range, for windows such as bone (threshold=200, threshold_max=3000).
    threshold_max: float | None = None
    # Keep only the largest 26-connected component: drops the patient table, blankets and
    # isolated noise voxels, which otherwise add sites without anatomy.
    body_mask: bool = True
    # "body": every kept voxel inside the body. "lungs": only the lung fields and what lies in
    # them (vessels, airways, nodules), as lung-nodule CAD pipelines do; needs body_mask. A scan
    # without lungs is refused with a one-line error. See ctsparse/regions.py.
    region: Literal["body", "lungs"] = "body"
    # Radius of the closing that pulls juxta-pleural nodules (dents in the lung outline) into the
    # lung region; 0 turns it off.
    lung_closing_mm: float = 10.0
    # On grids finer than this (mm), the lung region's closing and outline band run on blocks of
    # about this size: a 0.7 mm chest CT's region costs what a 2 mm one does (regions.py).
    # null: on the scan's own grid, whatever it costs.
    lung_grid_mm: float | None = 2.0
    # Crop the grid to the bounding box of kept voxels (smaller dense twin, smaller coordinates).
    crop: bool = True
    # "hu": one channel of normalized HU per voxel. "patch": space-to-depth, each kept k^3 block
    # becomes one site with its k^3 voxel values as channels (up to k^3 fewer sites). "patch" by
    # default: the sparse convolution's cost follows the site count, and k^3 blocks keep every
    # voxel's value at 1/k^3 of the sites. k = 4 by default: with the cross kernel the sparse model
    # is then faster than its dense twin at every occupancy up to 40 % on CPU (docs/benchmarks.md),
    # where 2^3 blocks lose from about 20 %; the grid the network sees is 4 voxels (2.8 mm at
    # 0.7 mm pixels). The planner (ctsparse plan) picks k from the data's spacing instead.
    features: Literal["hu", "patch"] = "patch"
    patch_size: int = 4
    # One more channel per site after the HU values: a constant 1, the site's occupancy (as
    # MinkowskiEngine's examples feed ones). Without it the first convolution cannot tell an
    # absent neighbour (read as 0) from a kept one whose normalised HU is 0 (HU = hu_center).
    occupancy_channel: bool = False
    # One more channel per site: the multiscale Hessian dot filter (ctsparse/filters.py), large at
    # the centre of round bright objects (nodules), small along vessels and walls.
    blob_channel: bool = False
    blob_scales_mm: list[float] = field(default_factory=lambda: [2.0, 3.0, 4.5])
    # The filter sees HU clipped to [-1000, blob_hu_max]: at -100 every structure denser than fat
    # looks alike, so contrast-filled vessels do not outshine soft-tissue nodules (filters.py).
    blob_hu_max: float = -100.0
    # The grid the filter runs on when preprocess.spacing resamples: "scan", the scan's own when
    # the resampled voxel is coarser than the smallest blob scale along some axis (the filter's
    # maxima are then carried to the resampled voxels they fall in), or always "resampled".
    # Resampling first blurs a nodule of two or three voxels before the filter sees it.
    blob_grid: Literal["scan", "resampled"] = "scan"
    # With the blob channel, the candidate stage of lung-nodule CAD: keep only the sites within
    # blob_candidate_mm of the scan's blob_candidates strongest blob maxima (picked greedily, each
    # at least blob_candidate_mm from the others), so the network compares a few dozen round
    # things (nodules, vessel junctions) instead of reading the whole lung. 0 keeps every site.
    blob_candidates: int = 0
    blob_candidate_mm: float = 12.0
    # Normalization: (HU - center) / scale. 1000 maps the window [-1000, 1000] to [-1, 1].
    hu_center: float = 0.0
    hu_scale: float = 1000.0


@dataclass
class ModelConfig:
    # sparse: the network on the kept sites, on ctsparse's own kernels for CPU batches of 6,000
    # sites or more (faster there than MinkowskiEngine 0.5.4's CPU backend, docs/benchmarks.md)
    # and on MinkowskiEngine for smaller CPU batches and on CUDA.
    # minkowski: the same network and weights on MinkowskiEngine everywhere. dense: the same
    # topology with Conv3d on the densified, cropped grid; it exists so that every sparse claim
    # has a dense baseline. Any engine of models/registry.py is accepted.
    backend: str = "sparse"
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    # cube: 3x3x3 (27 offsets). cross: the 7-offset cross, ~4x fewer kernel-map entries and
    # 2-4x faster on CPU (MinkowskiEngine's CPU convolution costs per kernel-map pair); the
    # planner measures both on the device and keeps the cube unless the cross is clearly faster.
    kernel: Literal["cube", "cross"] = "cross"
    stem_kernel: int = 3
    # Also pool the input features themselves (per-scan mean and max of each input channel, batch
    # normalized) and hand them to the head beside the network's features: a global skip that lets
    # a strong per-site channel (e.g. preprocess.blob_channel) reach the head from the first step.
    input_pooling: bool = False
    dropout: float = 0.1
    # K > 0: classify each of the scan's K candidate balls (preprocess.blob_candidates: K) on its
    # own and answer with the scan's most abnormal ball, as the false-positive reduction stage of
    # nodule CAD does (ctsparse/candidates.py). Trained ball by ball from the finding positions in
    # DATA/findings.csv, so training needs that file. The planner leaves it at 0 (on the tuning
    # phantoms it did not beat the scan labels, docs/benchmarks.md) and names it when it applies.
    candidates: int = 0
    # The class of a ball without a finding: index of the class whose scans findings.csv lists
    # nothing for. Set by train from the dataset (-1 until then).
    background: int = -1


@dataclass
class AugmentConfig:
    enabled: bool = True
    flip: bool = True  # left-right flips are anatomically plausible for lung findings
    rotate_deg: float = 10.0
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    hu_jitter: float = 20.0  # scanner calibration differs by tens of HU between vendors
    # With model.candidates: also turn each training ball to a random orientation of the grid
    # (every axis flipped at random, axes of equal site size swapped), as nodule CAD does with
    # its candidates. Off: on the tuning phantoms it did not help (docs/benchmarks.md).
    orient_balls: bool = False


@dataclass
class TrainConfig:
    epochs: int = 30
    # The global batch: with N processes (torchrun) each rank takes batch_size / N (rounded up), so
    # a config means the same optimisation whatever the number of processes.
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    # loss: class weights in the loss; sampler: class-balanced sampling of scans; balls (with
    # model.candidates): batch_size candidate balls per step drawn across all training scans, a
    # quarter of them finding balls (training/epoch.py, BallPool)
    balance: Literal["loss", "sampler", "none", "balls"] = "loss"
    # best.pt is the epoch with the highest validation `metric`; epochs tied on it (accuracy moves
    # in steps of 1/n on n validation scans) go to the lower validation loss
    metric: Literal["balanced_accuracy", "accuracy", "auroc", "loss"] = "balanced_accuracy"
    patience: int = 10  # epochs without improvement of `metric` before stopping
    val_fraction: float = 0.2
    seed: int = 0
    grad_clip: float = 5.0
    # Wall-clock budget: stop at the first epoch boundary where another epoch would exceed it.
    # Lets the sparse model and its dense twin be compared at the same training budget.
    max_minutes: float | None = None
    # With several processes, BatchNorm statistics over the whole global batch rather than each
    # rank's share: CT batches are small (a few scans per rank), and BN on 2-4 samples is noisy.
    # Costs two small all-reduces per BN layer per step. Ignored on one process.
    sync_bn: bool = True
    # The class a two-class task looks for, whose probability the operating threshold is set on.
    # None: the other class when exactly one name is normal-like (normal, negative, healthy, ...),
    # else the second in sorted order (ctsparse/calibration.py).
    positive_class: str | None = None
    # None: the threshold maximises Youden's J (sensitivity + specificity) on the validation split;
    # among thresholds that tie on it, the one balanced between the two classes' spreads.
    # A value (e.g. 0.9): the highest threshold whose validation sensitivity reaches it, for a
    # screening use where a missed finding costs more than a false alarm.
    target_sensitivity: float | None = None
    # Judge and keep an exponential moving average of the weights (updated every step, its
    # horizon this many epochs) instead of the weights of the last step: validation, best.pt and
    # early stopping see the average, which moves less from one epoch to the next than the
    # weights do. None: no average.
    ema_epochs: float | None = None


@dataclass
class DataConfig:
    # None: $CTSPARSE_CACHE/sparse or ~/.cache/ctsparse/sparse
    cache_dir: str | None = None
    # Processes that decode and sparsify scans into the cache (0: in the main process). Decoding
    # DICOM dominates the first epoch; later epochs read the cache.
    workers: int = 0


@dataclass
class Config:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


T = TypeVar("T")


def _check(value: Any, tp: Any, key: str) -> Any:
    """Validate (and lightly coerce, int -> float) one value against a type annotation."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
        return _from_dict(typing.cast(type, tp), value, key)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(value, option, key)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(key, " or ".join(errors) if errors else "must be null")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported type {tp}")  # pragma: no cover - a bug in the schema


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(full, f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _check(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate_section(obj, prefix)
    return obj


def validate_section(obj: Any, prefix: str) -> None:
    """Range checks that types cannot express."""
    p = f"{prefix}." if prefix else ""
    if isinstance(obj, PreprocessConfig):
        if obj.patch_size < 1:
            raise ConfigError(f"{p}patch_size", "must be >= 1")
        if obj.spacing is not None and (len(obj.spacing) != 3 or min(obj.spacing) <= 0):
            raise ConfigError(f"{p}spacing", "must be three positive numbers (mm)")
        if obj.window is not None and (len(obj.window) != 2 or obj.window[0] >= obj.window[1]):
            raise ConfigError(f"{p}window", "must be [low, high] with low < high")
        if obj.threshold_max is not None and obj.threshold_max <= obj.threshold:
            raise ConfigError(f"{p}threshold_max", "must be greater than threshold")
        if obj.lung_grid_mm is not None and obj.lung_grid_mm <= 0:
            raise ConfigError(f"{p}lung_grid_mm", "must be > 0 (mm) or null")
        if obj.hu_scale <= 0:
            raise ConfigError(f"{p}hu_scale", "must be > 0")
        if obj.blob_candidates < 0:
            raise ConfigError(f"{p}blob_candidates", "must be >= 0 (0 keeps every site)")
        if obj.blob_candidates > 0 and not obj.blob_channel:
            raise ConfigError(f"{p}blob_candidates", "needs preprocess.blob_channel: true (or set it to 0)")
        if obj.blob_candidate_mm <= 0:
            raise ConfigError(f"{p}blob_candidate_mm", "must be > 0 (mm)")
    elif isinstance(obj, ModelConfig):
        if obj.backend not in available():
            known = ", ".join(available())
            raise ConfigError(f"{p}backend", f"unknown backend {obj.backend!r} (known: {known})")
        if not obj.widths or len(obj.widths) != len(obj.depths):
            raise ConfigError(f"{p}widths", "widths and depths must be non-empty and equally long")
        if min(obj.widths) < 1 or min(obj.depths) < 1:
            raise ConfigError(f"{p}widths", "widths and depths must be >= 1")
        if obj.stem_kernel not in (1, 3, 5, 7):
            raise ConfigError(f"{p}stem_kernel", "must be 1, 3, 5 or 7")
        if obj.candidates < 0:
            raise ConfigError(f"{p}candidates", "must be >= 0 (0 classifies the scan whole)")
        if obj.candidates > 0 and obj.backend == "dense":
            raise ConfigError(f"{p}candidates", "needs a sparse backend (sparse or minkowski)")
    elif isinstance(obj, AugmentConfig):
        if len(obj.scale) != 2 or not 0 < obj.scale[0] <= obj.scale[1]:
            raise ConfigError(f"{p}scale", "must be [min, max] with 0 < min <= max")
    elif isinstance(obj, TrainConfig):
        if obj.epochs < 1 or obj.batch_size < 1:
            raise ConfigError(f"{p}epochs", "epochs and batch_size must be >= 1")
        if not 0 <= obj.val_fraction < 1:
            raise ConfigError(f"{p}val_fraction", "must be in [0, 1)")
        if obj.lr <= 0:
            raise ConfigError(f"{p}lr", "must be > 0")
        if obj.target_sensitivity is not None and not 0 < obj.target_sensitivity <= 1:
            raise ConfigError(f"{p}target_sensitivity", "must be in (0, 1] or null")
        if obj.ema_epochs is not None and obj.ema_epochs <= 0:
            raise ConfigError(f"{p}ema_epochs", "must be > 0 or null (no average)")
    elif isinstance(obj, DataConfig) and obj.workers < 0:
        raise ConfigError(f"{p}workers", "must be >= 0")


def from_dict(data: dict[str, Any]) -> Config:
    return _from_dict(Config, data)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[str, Any]:
    """'train.lr=1e-3' -> ('train.lr', 0.001). Values are parsed as YAML scalars/lists."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(item, "override must look like section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse value {raw!r}: {exc}") from exc
    return key.strip(), value


def check_overrides(overrides: list[str]) -> dict[str, Any]:
    """{dotted key: value} of --set items, each checked on its own: a known key, a value of its
    type. The checks between keys (widths against depths, ...) and ranges wait for the config the
    items complete, such as a plan that sets depths to go with the widths asked for."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, value = parse_override(item)
        cls: Any = Config
        parts = key.split(".")
        for i, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                known = ", ".join(sorted(names))
                raise ConfigError(".".join(parts[: i + 1]), f"unknown key (known: {known})")
            tp = typing.get_type_hints(cls)[part]
            if i == len(parts) - 1:
                out[key] = _check(value, tp, key)
            elif not dataclasses.is_dataclass(tp):
                raise ConfigError(key, f"'{part}' is not a section")
            else:
                cls = tp
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, value = parse_override(item)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{part}' is not a section")
        node[parts[-1]] = value
    return data


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping (empty for an empty file); ConfigError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), "config file not found")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), f"not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(str(p), "top level must be a mapping of sections")
    return loaded or {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then the --set overrides; validated as a whole."""
    data = read_yaml_mapping(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))
