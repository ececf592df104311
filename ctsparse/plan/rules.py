"""Facts -> settings: pure rules that turn a fingerprint and device measurements into a plan.

Every rule reads its numbers from the constants below, so that they can be tuned by experiment
without touching the logic, and every planned value carries the reason it was chosen.
make_plan(fp, meas, budget) depends on nothing else: the same inputs give the same plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctsparse.candidates import BALLS_PER_FINDING
from ctsparse.config import AugmentConfig, PreprocessConfig
from ctsparse.meters import format_bytes
from ctsparse.plan.fingerprint import LUNG_TISSUE_HU, PATCH_SIZES, Fingerprint
from ctsparse.plan.intensity import KIND_TEXT
from ctsparse.plan.measure import Machine, Measurements
from ctsparse.plan.records import Plan, Planned
from ctsparse.plan.summary import median_sites, summarize
from ctsparse.training.metrics import auroc

# Grid and patch size. The median scan should give the network at most this many sites: a training
# step of the default network took about 30 µs per site with the cube kernel and 12 µs with the
# cross on a 2-core CPU (phantoms, 2^3 patches), so 30 k sites is about 1 s per scan and step; a
# GPU is assumed to take ten times more in the same time.
SITE_BUDGET = {"cpu": 30_000, "cuda": 300_000}
# Coarsest input grid (patch size x the coarsest spacing, slice spacing included): at 8 mm a 6 mm
# nodule still fills most of one site; coarser sites average it away. Masks carry shape only and
# tolerate twice that. Slices thicker than half the limit therefore get no patch: every voxel is a
# site, and the in-plane spacing is coarsened instead when the site budget needs it. On 5 mm
# phantoms 4^3 patches (3 x 3 x 20 mm sites) gave 76 % held-out, every voxel of a 2.53 x 2.53 x 5
# mm grid 94 % (docs/benchmarks.md, "Thick slices").
MAX_INPUT_MM = 8.0
MAX_INPUT_MM_MASK = 16.0
PATCH_CANDIDATES = (2, 4)
PATCH_CANDIDATES_MASK = (2, 4, 8)
TINY_SITES = 5_000  # a grid this small needs no space-to-depth (k = 1 keeps every voxel a site)
# Region. Lung fields in at least this share of the scans make a chest CT dataset; a few scans
# without them (a scout, a head scan filed with the chest) are skipped, not planned for.
LUNG_SHARE = 0.9
# The lung check itself accepts 50 mL of air inside the body (ctsparse/regions.py), which sinus or
# bowel gas can reach; real lungs hold litres, so less than this is not counted as lungs.
CHEST_LUNG_ML = 300.0
# Kernel. The cross sees 7 of the 27 neighbours per layer (a smaller receptive field): worth it
# only for a clear gain in step time.
CROSS_SPEEDUP = 1.3
# Batch. Memory per scan x batch within this share of the RAM (or GPU memory), which leaves room
# for the cache, the data, the validation pass and whatever else runs; and at least this many
# steps per epoch, or a small dataset gets a handful of updates per epoch.
BATCH_CHOICES = (2, 4, 8)
MEMORY_SHARE = 0.25
# A few hundred scans make a few dozen steps per epoch at batch 8; larger batches left the
# phantom model at chance after a 10-minute budget (too few optimizer steps), smaller ones are
# noisier per step and slower per scan.
MIN_STEPS_PER_EPOCH = 16
# Learning rate for AdamW at batch 8, scaled linearly with the batch (chosen on tuning phantoms,
# where 0.002 at batch 16 had not left chance after 40 steps and 0.005 at batch 8 learned).
LR_AT_BATCH_8 = 0.005
# The lung region keeps what is denser than aerated lung: vessels, airways' walls and nodules,
# with their partial-volume rim (a 6 mm nodule on a 2-4 mm grid peaks well below soft tissue).
# The window maps -900..+100 HU, lung to soft tissue, to [-1, 1]. The threshold is the
# fingerprint's LUNG_TISSUE_HU (-700 HU).
LUNG_CENTER_HU, LUNG_SCALE_HU = -400.0, 500.0
# Candidate stage (preprocess.blob_candidates): on 2.5 mm chest phantoms the nodule of a nodule
# scan ranks among the few strongest blob maxima, so 32 balls of 12 mm keep it with its
# surroundings at about 1/15 of the lung region's sites (1,065 against 15,666 per scan).
BLOB_CANDIDATES = 32
BLOB_CANDIDATE_MM = 12.0
# It is planned only for a focal finding: when the strongest blob in the lungs (fingerprint,
# blob_max) separates one class from the rest with at least this AUROC over the read scans. A
# diffuse disease (emphysema, fibrosis, ground glass) shows no such difference and keeps the whole
# lung region. On 24 read phantoms (nodule / normal) the AUROC was 0.81-1.00 over ten datasets,
# and 0.65 with the labels of one of them shuffled.
FOCAL_AUROC = 0.7
MIN_PER_CLASS = 3
# Per-ball training: when findings.csv says where the findings are, and one class of scans has
# none (the background), each candidate ball is classified on its own and trained on batches of
# balls drawn across all scans, a quarter of them finding balls (train.balance "balls"). Each
# ball is seen on sites of at least BALL_SITE_MM, every voxel a site (a 12 mm ball about ten
# sites across), with the kept-site channel and air at 0 (a kept air-like site must not read as
# an absent one), in all the grid's orientations (no small rotations or scaling: each ball's
# lattice symmetries), by a three-stage network with the 27-neighbour kernel. On the tuning
# pair (600 default phantoms of seed 31, 200 of seed 32) it ranked the test scans better than
# the scan-label path (AUROC 0.964 against 0.947; docs/benchmarks.md, "Per-ball training").
BALL_SITE_MM = 2.5
BALL_WIDTHS, BALL_DEPTHS = [16, 32, 64], [1, 1, 1]
BALL_BATCH = 64
BALL_LR = 0.003
BALL_WARMUP_EPOCHS = 5
BALL_AIR_HU = -1000.0
# Finding balls per marked scan, for the epoch estimate: 248 in 240 training phantoms (a
# nodule's centre can be near two maxima, and a few are missed by the candidate stage).
FINDING_BALLS_PER_SCAN = 1.0
# Schedule. The training loop's time budget (preprocessing into the cache comes on top).
TRAIN_MINUTES = {"cpu": 10.0, "cuda": 30.0}
EPOCHS = (10, 100)  # fewer than 10 barely leaves the warm-up; more than 100 is overfitting time
# A patch size whose epochs fit fewer than this many times into the budget gives way to the next
# measured one within the input-grid limit: at 2 mm, 2^3 patches (21 k sites) left 8 epochs in 10
# minutes on 2 cores, too few to learn anything, where 4^3 patches (5 k sites) leave about 20.
MIN_EPOCHS_IN_BUDGET = 20
# Early stopping waits half the planned epochs: the schedule is cosine, so the best epochs come
# late, and a third (9 of 27) stopped a default-phantom run at epoch 15 on a noisy 40-scan
# validation split with most of its time budget unused.
PATIENCE_SHARE = 1 / 2
PATIENCE_MIN = 5
EVAL_COST = 0.35  # a validation forward costs about a third of a training step
# An epoch costs more than its measured steps: augmentation, collation, per-batch overhead. On the
# demo's phantoms (2 cores) epochs took 1.6x the measured steps plus validation.
EPOCH_OVERHEAD = 1.6
# Without a measurement (--no-measure): per site and per scan of a training step, erring high
# (measured on the 2-core CPU: 30 µs and 1-1.3 kB per site with the cube kernel).
STEP_S_PER_SITE = {"cpu": 4e-5, "cuda": 4e-6}
STEP_BYTES_PER_SITE = 4_000
# Preprocessing (decode + sparsify, once per scan into the cache) in worker processes: at most this
# many, when one process would take at least PREP_MIN_S (less does not repay the workers'
# start-up, 2-3 s each) at about PREP_S_PER_VOXEL per voxel of a scan's own grid (measured
# 0.2 us on a 500x500x277 chest CT, 0.5-0.8 us on 96x96x64 phantoms, lung region and blob
# channel), each worker holding about PREP_BYTES_PER_VOXEL of RAM (that chest CT, read and
# sparsified at 0.96 mm, peaked at 12 B per voxel; twice that for margin).
PREP_WORKERS_MAX = 4
PREP_MIN_S = 20.0
PREP_S_PER_VOXEL = 5e-7
PREP_BYTES_PER_VOXEL = 24
# Non-HU values: 20 HU of jitter is 1 % of the default 2000 HU window; the same share of the window.
JITTER_SHARE = 0.01


@dataclass(frozen=True)
class Budget:
    device: str = "cpu"
    memory_bytes: int = 8 << 30  # total RAM or GPU memory; the rules use MEMORY_SHARE of it
    train_minutes: float = TRAIN_MINUTES["cpu"]
    site_budget: int = SITE_BUDGET["cpu"]
    cpus: int = 1
    ram_bytes: int = 8 << 30  # host RAM, where scans are decoded and sparsified
    per_ball: bool = True  # False: scan labels asked for (--set model.candidates=0)

    @classmethod
    def for_machine(cls, m: Machine) -> Budget:
        dev = m.device if m.device in SITE_BUDGET else "cpu"
        return cls(dev, m.memory_bytes, TRAIN_MINUTES[dev], SITE_BUDGET[dev], m.cpus, m.ram_bytes)


def _r(x: float) -> float:
    return float(f"{x:.4g}")


def _intensity(fp: Fingerprint, s: dict[str, Any]) -> dict[str, Planned]:
    d, aug = PreprocessConfig(), AugmentConfig()
    lo, hi = s["min"]["min"], s["max"]["max"]
    if fp.kind == "hu":
        why = (
            f"values are HU (air at {s['min']['median']:g}, up to {s['max']['median']:g}"
            f"{', integer-valued' if s['integer_valued'] == fp.n_read else ''})"
        )
        return {
            "preprocess.threshold": Planned(
                d.threshold, f"{why}: the HU body threshold splits air from tissue"
            ),
            "preprocess.window": Planned(d.window, f"{why}: air below and metal above it carry no signal"),
            "preprocess.hu_center": Planned(d.hu_center, "HU default: the window maps to [-1, 1]"),
            "preprocess.hu_scale": Planned(d.hu_scale, "HU default: the window maps to [-1, 1]"),
            "preprocess.body_mask": Planned(True, "HU: the largest component above -500 HU drops the table"),
            "augment.hu_jitter": Planned(aug.hu_jitter, "HU default: scanners differ by tens of HU"),
        }
    prefix = f"values are not HU ({KIND_TEXT[fp.kind]}, range {lo:g}..{hi:g})"
    thr = _r(fp.data_threshold)
    norm = "hu_center/hu_scale normalise any values: (value - center) / scale"
    if fp.kind == "mask":
        half = (hi - lo) / 2 or 1.0
        window: list[float] = [lo, hi] if hi > lo else [lo, lo + 1.0]
        center, scale = _r((lo + hi) / 2), _r(half)
        how = f"threshold {thr:g}, the midpoint of the mask's two values"
        window_why = "the mask's two values"
        norm_why = f"{norm}; here the mask's midpoint and half range map it to -1 and 1"
        jitter, jitter_why = 0.0, "mask values are labels: no intensity jitter"
    else:
        p = s["percentiles"]
        window = [_r(p["p0.5"]["median"]), _r(p["p99.5"]["median"])]
        if window[0] >= window[1]:
            window = [lo, hi] if hi > lo else [lo, lo + 1.0]
        fg = fp.foreground
        spread = (fg["p75"] - fg["p25"]) / 1.349 or fg["std"] or (window[1] - window[0]) / 2
        center, scale = _r(fg["median"]), _r(spread)
        how = f"threshold {thr:g} (Otsu's cut between background and foreground)"
        window_why = "the median 0.5 and 99.5 percentiles"
        norm_why = f"{norm}; here the foreground's median and spread (IQR / 1.349)"
        jitter = _r(JITTER_SHARE * (window[1] - window[0]))
        jitter_why = f"{JITTER_SHARE:.0%} of the value window, as 20 HU is of the 2000 HU window"
    return {
        "preprocess.threshold": Planned(thr, f"{prefix}: {how} instead of the HU body threshold"),
        "preprocess.window": Planned(window, f"{prefix}: {window_why}"),
        "preprocess.hu_center": Planned(center, norm_why),
        "preprocess.hu_scale": Planned(scale, norm_why),
        "preprocess.body_mask": Planned(
            False, "the body mask is found at -500 HU, which means nothing for non-HU values"
        ),
        "augment.hu_jitter": Planned(jitter, jitter_why),
    }


def _region(fp: Fingerprint, per_ball_allowed: bool = True) -> dict[str, Planned]:
    if fp.kind != "hu":
        region = Planned("body", "values are not HU: the lung region is found from HU values")
    else:
        lungs = [s.lung_ml or 0.0 for s in fp.scans if s.lungs_found and (s.lung_ml or 0.0) >= CHEST_LUNG_ML]
        found = f"lungs found in {len(lungs)}/{fp.n_read} read scans"
        if len(lungs) >= LUNG_SHARE * fp.n_read:
            ml = sorted(lungs)[len(lungs) // 2]
            region = Planned(
                "lungs",
                f"{found} (median {ml / 1000:.1f} L): a chest CT dataset, so the classifier looks inside "
                "the lung fields as lung CAD pipelines do (scans without lungs are skipped); "
                "--set preprocess.region=body keeps the whole body",
            )
        else:
            region = Planned("body", f"{found} (a chest CT dataset needs {LUNG_SHARE:.0%}): the whole body")
    lungs_on = region.value == "lungs"
    why = "lung region: one more channel, the round-lesion (dot) filter" if lungs_on else "body region"
    out = {"preprocess.region": region, "preprocess.blob_channel": Planned(lungs_on, why)}
    if lungs_on:
        out |= _candidates(fp, per_ball_allowed)
        out["preprocess.threshold"] = Planned(
            LUNG_TISSUE_HU,
            f"lung region: keep what is denser than aerated lung ({LUNG_TISSUE_HU:g} HU), vessels and "
            "nodules with their partial-volume rim",
        )
        lung_window = "lung region: (HU - center) / scale maps -900..+100 HU, lung to soft tissue, to [-1, 1]"
        out["preprocess.hu_center"] = Planned(LUNG_CENTER_HU, lung_window)
        out["preprocess.hu_scale"] = Planned(LUNG_SCALE_HU, lung_window)
    return out


def blob_separation(fp: Fingerprint) -> tuple[float, str, int] | None:
    """How well the strongest blob in the lungs tells one class from the rest: the largest
    one-vs-rest AUROC of the read scans' blob_max, with its class and the number of scans; None
    with fewer than MIN_PER_CLASS measured scans in some class."""
    measured = [s for s in fp.scans if s.blob_max is not None]
    labels = np.array([s.label for s in measured])
    values = np.array([s.blob_max for s in measured], dtype=np.float64)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2 or counts.min() < MIN_PER_CLASS:
        return None
    auc, c = max((auroc(values, labels == c), str(c)) for c in classes)
    return auc, c, len(measured)


def _candidates(fp: Fingerprint, per_ball_allowed: bool) -> dict[str, Planned]:
    sep = blob_separation(fp)
    if sep is None:
        n_on = 0
        why = (
            f"fewer than {MIN_PER_CLASS} scans per class with lungs to compare: the whole lung "
            "region (no candidate stage)"
        )
    elif sep[0] >= FOCAL_AUROC:
        n_on = BLOB_CANDIDATES
        why = (
            f"the strongest round object in the lungs is stronger in '{sep[1]}' scans (AUROC "
            f"{sep[0]:.2f} on {sep[2]} read scans, {FOCAL_AUROC:g} wanted): a focal finding, so the "
            f"network sees the {BLOB_CANDIDATE_MM:g} mm around the {BLOB_CANDIDATES} strongest "
            "round-lesion maxima of each scan (the candidate stage of lung CAD), not every vessel"
        )
    else:
        n_on = 0
        why = (
            f"the strongest round object in the lungs does not tell the classes apart (AUROC "
            f"{sep[0]:.2f} on {sep[2]} read scans, {FOCAL_AUROC:g} wanted): not a focal finding, "
            "so the network sees the whole lung region"
        )
    out = {"preprocess.blob_candidates": Planned(n_on, why)}
    if n_on:
        out["preprocess.blob_candidate_mm"] = Planned(
            BLOB_CANDIDATE_MM, "a 20 mm nodule and what touches it fit in the ball"
        )
        out["model.candidates"] = _per_candidate(fp, n_on, per_ball_allowed)
    return out


def _per_candidate(fp: Fingerprint, n_balls: int, allowed: bool) -> Planned:
    """Whether to classify each candidate ball on its own (model.candidates): when findings.csv
    marks at least MIN_PER_CLASS scans and leaves exactly one class without findings."""
    if not allowed:
        return Planned(0, "scan labels, as the command line asked: the network sees a scan's balls together")
    if not fp.findings:
        return Planned(
            0, "scan labels only (no readable findings.csv): the network sees a scan's balls together"
        )
    background = [c for c in fp.class_counts if c not in fp.findings]
    marked = ", ".join(f"{n} of {fp.class_counts[c]} '{c}' scans" for c, n in fp.findings.items())
    if len(background) != 1:
        return Planned(0, f"findings.csv marks {marked}: no one class without findings as the background")
    if sum(fp.findings.values()) < MIN_PER_CLASS:
        return Planned(0, f"findings.csv marks only {marked} ({MIN_PER_CLASS} wanted): scan labels")
    return Planned(
        n_balls,
        f"findings.csv marks {marked}: each of the {n_balls} balls is classified on its own, "
        f"'{background[0]}' as the background, and the scan answers with its most abnormal ball "
        "(the false-positive reduction stage of lung CAD); --set model.candidates=0 classifies the "
        "balls together from the scan labels",
    )


def per_ball(values: dict[str, Planned]) -> bool:
    cand = values.get("model.candidates")
    return cand is not None and int(cand.value) > 0


def _ball_inputs(fp: Fingerprint) -> dict[str, Planned]:
    """Grid, encoding, network and augmentation of per-ball training (see BALL_SITE_MM)."""
    native = [float(v) for v in fp.analysis_spacing]
    spacing = [max(v, BALL_SITE_MM) for v in native]
    txt = " x ".join(f"{v:g}" for v in spacing)
    sp_why = (
        f"per ball: sites of at least {BALL_SITE_MM:g} mm ({txt} mm from the median "
        f"{' x '.join(f'{v:g}' for v in native)} mm), so a {BLOB_CANDIDATE_MM:g} mm ball is about "
        f"{2 * BLOB_CANDIDATE_MM / max(spacing):.0f} sites across"
    )
    enc = (
        "per ball: air maps to 0 and a channel marks the kept sites, so a kept air-like site is not "
        "read as an absent one"
    )
    orient = "per ball: each training ball in a random orientation of the grid (all 48 on isotropic sites)"
    lattice = "per ball: the grid's own orientations (augment.orient_balls), which move no site off the grid"
    net = "per ball: three stages of 16, 32, 64 channels cover a 12 mm ball"
    return {
        "preprocess.spacing": Planned(spacing, sp_why),
        "preprocess.features": Planned("hu", "per ball: every voxel a site"),
        "preprocess.patch_size": Planned(1, "per ball: every voxel a site"),
        "preprocess.occupancy_channel": Planned(True, enc),
        "preprocess.hu_center": Planned(BALL_AIR_HU, enc),
        "preprocess.hu_scale": Planned(LUNG_SCALE_HU, enc),
        "model.widths": Planned(BALL_WIDTHS, net),
        "model.depths": Planned(BALL_DEPTHS, net),
        "model.kernel": Planned("cube", "per ball: all 27 neighbours, on a few hundred sites a ball"),
        "model.input_pooling": Planned(False, "per ball: the ball's own features decide"),
        "augment.orient_balls": Planned(True, orient),
        "augment.rotate_deg": Planned(0.0, lattice),
        "augment.scale": Planned([1.0, 1.0], lattice),
    }


def _ball_training(
    fp: Fingerprint, meas: Measurements | None, budget: Budget, n_balls: int
) -> dict[str, Planned]:
    """Batch, learning rate and epochs of per-ball training: an epoch draws every finding ball
    about once, with three background balls for each (training/epoch.py, BallPool)."""
    fig = meas.step("cube", 1) if meas is not None else None
    if fig is not None:
        scan_step, src = fig.step_s, f"measured on {meas.device if meas else ''}"
    else:
        sites = median_sites(fp, "lungs", 1) or median_sites(fp, "body", 1) or 0.0
        scan_step, src = sites * STEP_S_PER_SITE[budget.device], "estimated (not measured)"
    marked = sum(fp.findings.values()) * fp.n_train / max(fp.n_scans, 1)
    steps = max(1, math.ceil(BALLS_PER_FINDING * FINDING_BALLS_PER_SCAN * marked / BALL_BATCH))
    step = scan_step * BALL_BATCH / n_balls
    epoch_s = max((steps * step + fp.n_val * scan_step * EVAL_COST) * EPOCH_OVERHEAD, 1e-3)
    how = (
        f"about {steps} steps of {BALL_BATCH} balls, {marked:.0f} marked train scans x "
        f"{FINDING_BALLS_PER_SCAN:g} finding ball x {BALLS_PER_FINDING}; {scan_step * 1e3:.0f} ms per "
        f"scan of {n_balls} balls, {src}"
    )
    return {
        "train.balance": Planned(
            "balls",
            "per ball: each step draws balls across all scans, a quarter with a finding (1:3 as "
            "nodule CAD samples candidates); a batch of whole scans holds about one in 64",
        ),
        "train.batch_size": Planned(BALL_BATCH, "per ball: balls per step"),
        "train.lr": Planned(BALL_LR, f"per ball: at batch {BALL_BATCH}"),
        "train.warmup_epochs": Planned(BALL_WARMUP_EPOCHS, "per ball: epochs are a few steps each"),
        **_schedule(budget, epoch_s, how),
    }


def input_limit(fp: Fingerprint) -> float:
    """The coarsest site allowed along any axis (mm): MAX_INPUT_MM, or MAX_INPUT_MM_MASK for masks."""
    return MAX_INPUT_MM_MASK if fp.kind == "mask" else MAX_INPUT_MM


def patch_fits(spacing: list[float], k: int, limit: float) -> bool:
    """Whether k^3 patches of `spacing` voxels make sites within `limit` mm along every axis."""
    return k * max(spacing) <= limit


def site_text(spacing: list[float], k: int) -> str:
    """A site's size in mm per axis, e.g. "3.0 x 3.0 x 20.0" for k = 4 on 0.75 x 0.75 x 5 mm."""
    return " x ".join(f"{k * v:.1f}" for v in spacing)


def _grid(fp: Fingerprint, region: str, budget: Budget) -> dict[str, Planned]:
    spacing = [float(v) for v in fp.analysis_spacing]
    sc = fp.scans
    ranges = [(min(s.spacing[a] for s in sc), max(s.spacing[a] for s in sc)) for a in range(3)]
    mixed = any(hi - lo > 0.01 * hi for lo, hi in ranges)
    txt = " x ".join(f"{v:g}" for v in spacing)
    if mixed:
        axes = zip("xyz", ranges, strict=True)
        rng = ", ".join(f"{a} {lo:.3g}-{hi:.3g}" for a, (lo, hi) in axes if hi > lo)
        sp_why = f"median of {fp.n_read} read scans ({rng} mm): mixed spacings are resampled to one grid"
    else:
        sp_why = f"all {fp.n_read} read scans are {txt} mm: new scans are resampled to it at predict"
    sites = {k: median_sites(fp, region, k) for k in PATCH_SIZES}
    inplane, coarsest = max(spacing[:2]), max(spacing)
    limit = input_limit(fp)
    cands = PATCH_CANDIDATES_MASK if fp.kind == "mask" else PATCH_CANDIDATES
    budget_txt = f"the {budget.site_budget:,} site budget ({budget.device})"
    s1 = sites[1]
    allowed = [c for c in cands if patch_fits(spacing, c, limit)]
    if s1 is None:
        k, k_why = 2, "no site counts (no scan could be sparsified at the median spacing): the default 2"
    elif s1 <= TINY_SITES or (not allowed and s1 <= budget.site_budget):
        k, k_why = 1, f"the median scan keeps {s1:,.0f} voxels at {txt} mm: every voxel is a site"
    else:
        if allowed:
            fits = [c for c in allowed if (sites[c] or 0) <= budget.site_budget]
            k = fits[0] if fits else allowed[-1]
            n_k = sites[k] or 0.0
            k_why = (
                f"{k}^3 voxels per site: median {n_k:,.0f} sites per scan, input grid "
                f"{site_text(spacing, k)} mm (limit {limit:g} mm)"
            )
            if fits:
                k_why += f"; the smallest patch within {budget_txt}"
        else:  # thick slices: a patch would stack them into sites deeper than the limit
            k, n_k, fits = 1, s1, []
            k_why = (
                f"every voxel is a site: a {cands[0]}^3 patch would make {site_text(spacing, cands[0])} mm "
                f"sites (limit {limit:g} mm) out of {coarsest:g} mm voxels"
            )
        if not fits:
            factor = math.sqrt(n_k / budget.site_budget)
            new = min(math.ceil(inplane * factor * 100) / 100, limit / k)
            spacing[0] = spacing[1] = new
            sp_why += (
                f"; in-plane coarsened from {inplane:g} to {new:g} mm: {n_k:,.0f} sites at k={k} exceed "
                f"{budget_txt} (about {n_k * inplane**2 / new**2:,.0f} after)"
            )
    return {
        "preprocess.spacing": Planned(spacing, sp_why),
        "preprocess.features": Planned("patch" if k > 1 else "hu", "space-to-depth" if k > 1 else "k = 1"),
        "preprocess.patch_size": Planned(k, k_why),
    }


def plan_preprocess(fp: Fingerprint, budget: Budget) -> dict[str, Planned]:
    """The preprocessing part of the plan (what the device measurement runs on)."""
    s = summarize(fp)
    out = _intensity(fp, s) | _region(fp, budget.per_ball)
    if per_ball(out):
        return out | _ball_inputs(fp)
    return out | _grid(fp, str(out["preprocess.region"].value), budget)


def measure_candidates(fp: Fingerprint, budget: Budget) -> list[tuple[str, int]]:
    """(kernel, patch size) pairs worth timing: the planned patch size and every other candidate
    within the input-grid limit and the site budget, each with the cube and the cross kernel."""
    pre = plan_preprocess(fp, budget)
    if per_ball(pre):
        return [("cube", 1)]
    k = int(pre["preprocess.patch_size"].value)
    region = str(pre["preprocess.region"].value)
    spacing = [float(v) for v in pre["preprocess.spacing"].value]
    mask = fp.kind == "mask"
    limit = input_limit(fp)
    sizes = (
        {k}
        if k == 1
        else {k}
        | {
            c
            for c in (PATCH_CANDIDATES_MASK if mask else PATCH_CANDIDATES)
            if patch_fits(spacing, c, limit)
            and (median_sites(fp, region, c) or math.inf) <= budget.site_budget
        }
    )
    # the planned size first and the cube (the larger) before the cross: see measure_device
    return [(kernel, c) for c in sorted(sizes, key=lambda c: c != k) for kernel in ("cube", "cross")]


def _kernel(meas: Measurements | None, k: int) -> Planned:
    if meas is None:
        return Planned("cross", "not measured: cross, the default (2-4x faster than the cube on CPU)")
    cube, cross = meas.step("cube", k), meas.step("cross", k)
    if cube is None or cross is None:
        missing = "; ".join(meas.errors) or "not measured"
        if cube is None and cross is None:
            return Planned("cross", f"neither kernel measured ({missing}): cross, the default")
        only = "cross" if cross is not None else "cube"
        return Planned(only, f"cube and cross not both measured ({missing}): {only}, the one that ran")
    speed = cube.step_s / cross.step_s
    times = f"{cube.step_s * 1e3:.0f} vs {cross.step_s * 1e3:.0f} ms per scan and step"
    if speed >= CROSS_SPEEDUP:
        return Planned("cross", f"cross measured {speed:.2f}x faster than cube ({times})")
    return Planned("cube", f"cross only {speed:.2f}x faster than cube ({times}; needs {CROSS_SPEEDUP:g}x)")


def _training(
    fp: Fingerprint, meas: Measurements | None, budget: Budget, kernel: str, k: int, region: str
) -> dict[str, Planned]:
    fig = meas.step(kernel, k) if meas is not None else None
    n_sites = median_sites(fp, region, k) or median_sites(fp, "body", k) or 0.0
    if fig is not None:
        # the largest peak at this patch size: the cube's, measured first, bounds the cross's
        peak = max(s.peak_bytes for s in meas.steps if s.patch_size == k) if meas else fig.peak_bytes
        step, mem, src = fig.step_s, peak, f"measured on {meas.device if meas else ''}"
    else:
        step = n_sites * STEP_S_PER_SITE[budget.device]
        mem, src = int(n_sites * STEP_BYTES_PER_SITE), f"estimated from {n_sites:,.0f} sites (not measured)"
    room = budget.memory_bytes * MEMORY_SHARE
    cap = fp.n_train // MIN_STEPS_PER_EPOCH
    fits = [b for b in BATCH_CHOICES if b * mem <= room and b <= cap]
    batch = max(fits) if fits else BATCH_CHOICES[0]
    b_why = (
        f"{format_bytes(mem)} per scan ({src}) x {batch} within {MEMORY_SHARE:.0%} of "
        f"{format_bytes(budget.memory_bytes)}; at most {fp.n_train} train scans / {MIN_STEPS_PER_EPOCH}"
    )
    if not fits:
        b_why += f": none of {list(BATCH_CHOICES)} fits both, the smallest"
    epoch_s = _epoch_seconds(fp, step)
    how = f"{fp.n_train} train scans x {step * 1e3:.0f} ms, {src}"
    lr = _r(LR_AT_BATCH_8 * batch / 8)
    return {
        "train.batch_size": Planned(batch, b_why),
        "train.lr": Planned(lr, f"{LR_AT_BATCH_8:g} at batch 8, scaled linearly with the batch"),
        **_schedule(budget, epoch_s, how),
    }


def _schedule(budget: Budget, epoch_s: float, how: str) -> dict[str, Planned]:
    """Epochs, patience and the time budget for epochs of `epoch_s` seconds (`how`: what the
    estimate is made of, for the reason)."""
    budget_s = budget.train_minutes * 60
    raw = budget_s / epoch_s
    epochs = min(max(int(raw), EPOCHS[0]), EPOCHS[1])
    e_why = (
        f"{budget.train_minutes:g} min / {epoch_s:.1f} s per epoch ({how}, + validation, x "
        f"{EPOCH_OVERHEAD:g} for the rest of an epoch) = {raw:.0f}, within {EPOCHS[0]}..{EPOCHS[1]}"
    )
    patience = min(epochs, max(PATIENCE_MIN, round(epochs * PATIENCE_SHARE)))
    m_why = "the time budget: the run stops at the first epoch boundary that would overrun it"
    if epochs * epoch_s > budget_s:
        m_why += f" (after about {max(1, int(raw))} of {epochs} epochs)"
    return {
        "train.epochs": Planned(epochs, e_why),
        "train.patience": Planned(patience, f"{PATIENCE_SHARE:.0%} of the epochs (at least {PATIENCE_MIN})"),
        "train.max_minutes": Planned(budget.train_minutes, m_why),
    }


def _workers(fp: Fingerprint, budget: Budget) -> Planned:
    """Processes that decode and sparsify the scans into the cache before the first epoch."""
    voxels = sorted(math.prod(s.shape) for s in fp.scans)[len(fp.scans) // 2] if fp.scans else 0
    per = voxels * PREP_BYTES_PER_VOXEL
    fit = int(budget.ram_bytes * MEMORY_SHARE // max(per, 1))
    n = min(budget.cpus, PREP_WORKERS_MAX, fit, fp.n_scans)
    alone = fp.n_scans * voxels * PREP_S_PER_VOXEL
    if alone < PREP_MIN_S:
        return Planned(
            0,
            f"{fp.n_scans} scans of median {voxels / 1e6:.3g} M voxels take about {alone:.0f} s to "
            "preprocess in the training process: workers would not repay their start",
        )
    if n < 2:
        why = (
            "one CPU"
            if budget.cpus < 2
            else f"{format_bytes(per)} per scan leaves room for one in {MEMORY_SHARE:.0%} of RAM"
        )
        return Planned(0, f"decoded and sparsified in the training process: {why}")
    return Planned(
        n,
        f"{fp.n_scans} scans (median {voxels / 1e6:.3g} M voxels) decoded and sparsified once into the cache "
        f"by {n} processes: {budget.cpus} CPUs, about {format_bytes(per)} each within {MEMORY_SHARE:.0%} of "
        f"{format_bytes(budget.ram_bytes)} RAM, at most {PREP_WORKERS_MAX}; --workers overrides",
    )


def _epoch_seconds(fp: Fingerprint, step_s: float) -> float:
    return max((fp.n_train * step_s + fp.n_val * step_s * EVAL_COST) * EPOCH_OVERHEAD, 1e-3)


def _coarser_patch(fp: Fingerprint, meas: Measurements, budget: Budget, values: dict[str, Planned]) -> None:
    """Move to the next measured patch size when the planned one leaves too few epochs."""
    k = int(values["preprocess.patch_size"].value)
    spacing = [float(v) for v in values["preprocess.spacing"].value]
    limit = input_limit(fp)
    budget_s = budget.train_minutes * 60

    def epochs(size: int) -> float:
        fig = meas.step(str(_kernel(meas, size).value), size)
        return budget_s / _epoch_seconds(fp, fig.step_s) if fig is not None else 0.0

    first = epochs(k)
    if k <= 1 or first == 0.0 or first >= MIN_EPOCHS_IN_BUDGET:
        return
    for bigger in sorted({s.patch_size for s in meas.steps if s.patch_size > k}):
        if patch_fits(spacing, bigger, limit) and epochs(bigger) > first:
            why = (
                f"{bigger}^3 voxels per site, input grid {site_text(spacing, bigger)} mm "
                f"(limit {limit:g} mm): "
                f"{k}^3 would fit {first:.0f} epochs into the {budget.train_minutes:g} min budget, "
                f"{bigger}^3 fits {epochs(bigger):.0f} (measured; {MIN_EPOCHS_IN_BUDGET} wanted)"
            )
            values["preprocess.patch_size"] = Planned(bigger, why)
            if epochs(bigger) >= MIN_EPOCHS_IN_BUDGET:
                return
            k, first = bigger, epochs(bigger)


def make_plan(fp: Fingerprint, meas: Measurements | None, budget: Budget) -> Plan:
    """The plan: every value with its reason (pure: no I/O, no clock, no randomness)."""
    values = plan_preprocess(fp, budget)
    if per_ball(values):
        values |= _ball_training(fp, meas, budget, int(values["model.candidates"].value))
    else:
        if meas is not None and values["preprocess.features"].value == "patch":
            _coarser_patch(fp, meas, budget, values)
        k = int(values["preprocess.patch_size"].value)
        region = str(values["preprocess.region"].value)
        values["model.kernel"] = _kernel(meas, k)
        blob = bool(values["preprocess.blob_channel"].value)
        values["model.input_pooling"] = Planned(
            blob, "the pooled blob channel reaches the head directly" if blob else "no blob channel"
        )
        values |= _training(fp, meas, budget, str(values["model.kernel"].value), k, region)
    values["data.workers"] = _workers(fp, budget)
    notes = []
    if fp.kind != "hu":
        notes.append(str(values["preprocess.threshold"].reason))
    kinds = summarize(fp)["kinds"]
    if len(kinds) > 1:
        notes.append(f"the read scans hold mixed value kinds {kinds}: planned for '{fp.kind}'")
    if fp.failed:
        notes.append(f"{len(fp.failed)} selected scans could not be read (first: {fp.failed[0]})")
    if meas is not None:
        notes += [f"measurement: {e}" for e in meas.errors]
    return Plan(values, summarize(fp), bool(meas and meas.steps), tuple(notes))
