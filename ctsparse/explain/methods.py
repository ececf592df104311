"""Saliency per input site for one scan: Grad-CAM, input x gradient and occlusion.

Each method returns a non-negative value per site of the SparseVolume (its order) for one class,
together with the logits of the unmodified scan. The class is chosen from those logits (`choose`,
e.g. the predicted one), so the pass that computes them also explains them. The score
differentiated or compared is that class's logit, as in the Grad-CAM paper (before the softmax,
so a saturated probability does not flatten the map).

- gradcam: Grad-CAM of every feature map the head pools. The last stage's activations A (one row
  per cell) weighted by the mean gradient of the score over the cells, summed over channels,
  ReLU; each input site takes the value of the cell that covers it through the strides. A network
  with input pooling also hands the head the mean and max of its input channels, a second map at
  full resolution whose evidence never passes the last stage: its map is taken on the sites, each
  site weighted by its own gradient (see _site_cam), and the two maps are added, each scaled to
  its first-order contribution to the score. One forward and one backward pass, which also give
  the input's gradient that breaks ties between the sites of one cell.
- inputxgrad: the input features times the gradient of the score with respect to them, summed
  over channels, positive part: full resolution, one forward and one full backward pass.
- occlusion: gradient-free. Blocks of sites are removed (a removed site is what the network sees
  for air) and the drop of the score is the value of every site in the block: one forward pass
  per block, so the block grows until there are at most MAX_BLOCKS of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ctsparse.errors import CtsparseError
from ctsparse.sparse_volume import SparseVolume, rows_of

if TYPE_CHECKING:
    import torch

    from ctsparse.config import ModelConfig
    from ctsparse.models.engine import Engine

METHODS = ("gradcam", "inputxgrad", "occlusion")
GRADIENT_METHODS = ("gradcam", "inputxgrad")
# Forward passes occlusion may spend on one scan; blocks of 1, 2, 4, ... sites per axis are tried
# until they are this few.
MAX_BLOCKS = 64
OCCLUSION_BATCH = 8  # occluded copies per forward pass

F32 = npt.NDArray[np.float32]
Choose = Callable[[npt.NDArray[np.float64]], int]


@dataclass
class SiteMap:
    values: F32  # (N,) >= 0, in site order
    target: int  # the class index explained
    logits: npt.NDArray[np.float64]  # (classes,) of the unmodified scan
    peak: int  # the site where the evidence is strongest (ties in `values` broken by the method)
    info: dict[str, Any] = field(default_factory=dict)


def site_saliency(
    model: torch.nn.Module,
    engine: Engine,
    cfg: ModelConfig,
    sv: SparseVolume,
    choose: Choose,
    method: str,
    device: torch.device,
) -> SiteMap:
    """Saliency on every site of `sv` with `method` (METHODS) of the class index that
    choose(logits of the scan) returns."""
    if method not in METHODS:
        raise CtsparseError(f"unknown explanation method {method!r} (known: {', '.join(METHODS)})")
    if cfg.candidates > 0:
        return _on_chosen_ball(model, engine, cfg, sv, choose, method, device)
    if method == "occlusion":
        return occlusion(model, engine, cfg, sv, choose, device)
    if engine.explain is None:
        raise CtsparseError(
            f"the {engine.name!r} engine has no saliency hooks: only --method occlusion works with it"
        )
    x = engine.inputs([sv], device, cfg)
    if method == "gradcam":
        return gradcam(model, engine, x, sv, choose)
    return input_x_gradient(model, engine, x, sv, choose)


def _on_chosen_ball(
    model: torch.nn.Module,
    engine: Engine,
    cfg: ModelConfig,
    sv: SparseVolume,
    choose: Choose,
    method: str,
    device: torch.device,
) -> SiteMap:
    """A per-candidate model (model.candidates) answers with one ball of the scan: the map is that
    ball's, explained as a scan of its own, and zero on the sites of the other balls."""
    import dataclasses

    import torch

    from ctsparse.candidates import most_abnormal_ball, split_balls
    from ctsparse.data.augment import aligned

    k = cfg.candidates
    balls = split_balls(sv, k)
    with torch.no_grad():
        by_ball = model(engine.inputs([sv], device, cfg), per_ball=True)
        chosen = int(most_abnormal_ball(by_ball, k, cfg.background)[0])
    ball = balls[chosen]
    one = dataclasses.replace(cfg, candidates=0)
    saved = model.candidates
    model.candidates = 0  # type: ignore[assignment]  # the ball's own logits are the scan's
    try:  # the ball as the network saw it (aligned: its rows are the ball's, in order)
        inner = site_saliency(model, engine, one, aligned(ball), choose, method, device)
    finally:
        model.candidates = saved
    rows = rows_of(sv.coords, ball.coords)
    values = np.zeros(sv.n_sites, np.float32)
    values[rows] = inner.values
    info = {**inner.info, "candidate_ball": chosen, "ball_sites": ball.n_sites}
    return SiteMap(values, inner.target, inner.logits, int(rows[inner.peak]), info)


def _numpy(logits: torch.Tensor) -> npt.NDArray[np.float64]:
    return logits.detach().double().cpu().numpy()[0]  # type: ignore[no-any-return]


def gradcam(model: torch.nn.Module, engine: Engine, x: Any, sv: SparseVolume, choose: Choose) -> SiteMap:
    import torch

    assert engine.explain is not None
    # one forward pass with gradient from the input and one backward pass give both the maps'
    # gradients (Grad-CAM) and the input's (to place the peak inside the top cell)
    leaf, gather = engine.explain.input_sites(x, sv)
    stage = engine.explain.last_stage(model, x, sv)
    logits = stage.head(stage.feats)
    target = choose(_numpy(logits))
    wrt = [stage.feats, leaf] + ([stage.pooled] if stage.pooled is not None else [])
    grads = torch.autograd.grad(logits[0, target], wrt)
    last, contribution = _cam(stage.feats, grads[0])
    sources = {"last_stage": (last[stage.cell_of_site].float().cpu().numpy(), float(contribution))}
    if stage.pooled is not None:
        pooled, pooled_contribution = _site_cam(stage.pooled, grads[2])
        sources["input_pooling"] = (pooled.float().cpu().numpy(), float(pooled_contribution))
    values = _combine(list(sources.values()))
    fine = torch.relu((gather(grads[1]) * gather(leaf.detach())).sum(dim=1)).float().cpu().numpy()
    info = {
        "cells": int(stage.feats.shape[0]),
        "channels": int(stage.feats.shape[1]),
        "maps": {name: round(c, 6) for name, (_, c) in sources.items()},
        "last_stage_peak": _peak(sources["last_stage"][0], fine),
        "peak_rule": "the site of highest Grad-CAM; among equal ones (the sites of one cell), the one "
        "of highest input x gradient",
    }
    return SiteMap(values, target, _numpy(logits), _peak(values, fine), info)


def _cam(feats: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of one feature map (rows, channels): the rows' activations weighted by the mean
    gradient over the rows, summed over channels, ReLU; and the map's first-order contribution
    to the score (the same weighted sum before the ReLU, over all rows)."""
    weighted = feats.detach() @ grad.mean(dim=0)
    return weighted.clamp_min(0), weighted.sum()


def _site_cam(feats: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same for the input map, with each site's own gradient instead of the mean over the
    sites (HiResCAM's weighting): its pooling is a mean and a max straight into the linear head,
    so activation times gradient is each site's exact share of the score, all of a max's on the
    site it came from, where a mean over the sites would spread it over the whole scan."""
    weighted = (feats.detach() * grad).sum(dim=1)
    return weighted.clamp_min(0), weighted.sum()


def _combine(sources: list[tuple[F32, float]]) -> F32:
    """One map on the sites from the Grad-CAMs of every feature map the head pools (the last
    stage and, with input pooling, the input): each scaled so that its sum over the sites is its
    positive contribution to the score, so each carries the share of the answer it gave."""
    out = np.zeros_like(sources[0][0])
    for cam, contribution in sources:
        if contribution > 0 and float(cam.sum()) > 0:
            out += cam * np.float32(contribution / float(cam.sum()))
    return out if out.any() else sources[0][0]  # no positive evidence: the last stage's map as it is


def _peak(values: F32, tie_break: F32) -> int:
    """The site of highest value; among (near-)equal ones, the one of highest `tie_break`."""
    top = np.flatnonzero(values >= values.max() * (1 - 1e-6))
    return int(top[np.argmax(tie_break[top])])


def input_x_gradient(
    model: torch.nn.Module, engine: Engine, x: Any, sv: SparseVolume, choose: Choose
) -> SiteMap:
    import torch

    assert engine.explain is not None
    leaf, gather = engine.explain.input_sites(x, sv)
    logits = model(x)
    target = choose(_numpy(logits))
    (grad,) = torch.autograd.grad(logits[0, target], leaf)
    contribution = (gather(grad) * gather(leaf.detach())).sum(dim=1)
    values = torch.relu(contribution).float().cpu().numpy()
    return SiteMap(values, target, _numpy(logits), int(np.argmax(values)))


def occlusion_blocks(coords: npt.NDArray[np.int32], max_blocks: int = MAX_BLOCKS) -> tuple[int, Any]:
    """(block size in sites, block index of every site): the smallest power-of-two block whose
    count of occupied blocks is at most `max_blocks`."""
    size = 1
    while True:
        _, inverse = np.unique(coords // size, axis=0, return_inverse=True)
        if int(inverse.max()) + 1 <= max_blocks:
            return size, inverse.reshape(-1)
        size *= 2


def occlusion(
    model: torch.nn.Module,
    engine: Engine,
    cfg: ModelConfig,
    sv: SparseVolume,
    choose: Choose,
    device: torch.device,
) -> SiteMap:
    """Blocks of `size` sites removed one at a time; then, coarse to fine, the top block is split
    into its 8 half-size blocks, each removed from the whole scan, down to one site: the peak."""
    import torch

    size, block_of = occlusion_blocks(sv.coords)
    n_blocks = int(block_of.max()) + 1
    with torch.no_grad():
        base = _numpy(model(engine.inputs([sv], device, cfg)))
        target = choose(base)

        def drops(groups: list[npt.NDArray[np.intp]]) -> npt.NDArray[np.float64]:
            out = np.zeros(len(groups))
            for g0 in range(0, len(groups), OCCLUSION_BATCH):
                batch = []
                for group in groups[g0 : g0 + OCCLUSION_BATCH]:
                    keep = np.ones(sv.n_sites, dtype=bool)
                    keep[group] = False
                    batch.append(_subset(sv, keep))
                logits = model(engine.inputs(batch, device, cfg)).double().cpu().numpy()
                out[g0 : g0 + len(batch)] = base[target] - logits[:, target]
            return out

        if n_blocks == 1:  # removing the only block would leave nothing to classify
            return SiteMap(
                np.zeros(sv.n_sites, np.float32), target, base, 0, {"block_sites": size, "blocks": 1}
            )
        drop = drops(_groups(block_of))
        region = np.flatnonzero(block_of == int(np.argmax(drop)))
        passes, sub = n_blocks, size
        while sub > 1 and region.size > 1:
            sub //= 2
            _, inverse = np.unique(sv.coords[region] // sub, axis=0, return_inverse=True)
            groups = [region[g] for g in _groups(inverse.reshape(-1))]
            if len(groups) > 1:
                region = groups[int(np.argmax(drops(groups)))]
                passes += len(groups)
    values = np.maximum(drop, 0.0)[block_of].astype(np.float32)
    info = {
        "block_sites": size,
        "blocks": n_blocks,
        "forward_passes": passes + 1,
        "peak_rule": "the block of largest drop, split in halves down to one site, each removed alone",
    }
    return SiteMap(values, target, base, int(region[0]), info)


def _groups(labels: npt.NDArray[np.intp]) -> list[npt.NDArray[np.intp]]:
    """Site indices of each label 0..max."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(int(labels.max()) + 2))
    return [order[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]


def _subset(sv: SparseVolume, keep: npt.NDArray[np.bool_]) -> SparseVolume:
    return SparseVolume(
        coords=np.ascontiguousarray(sv.coords[keep]),
        feats=np.ascontiguousarray(sv.feats[keep]),
        grid_shape=sv.grid_shape,
        affine=sv.affine,
        params=sv.params,
        source=sv.source,
    )
