"""What an engine is: everything the rest of ctsparse needs to know to run one kind of network.

An engine is one `Engine` value, defined by its module under models/ (`ENGINE = Engine(...)`) and
listed in `models/registry.py`. Training, predict, the planner, the benchmark and doctor ask the
engine of `model.backend` for what they need and never compare backend names, so a new engine is
a local change: one module plus its registry line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ctsparse.config import ModelConfig
    from ctsparse.sparse_volume import SparseVolume


@dataclass(frozen=True)
class Check:
    """One line of the environment report (`ctsparse doctor`): what was probed, whether it is
    usable, what was found, and how to fix it when it is not."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def _any_grid(cfg: ModelConfig) -> int:
    return 1


def _nothing_to_check() -> list[Check]:
    return []


def _no_versions() -> dict[str, str]:
    return {}


def _no_fields() -> dict[str, Any]:
    return {}


def _accept(cfg: ModelConfig, checkpoint: Mapping[str, Any]) -> str | None:
    return None


def _no_detail(device: torch.device) -> str:
    return ""


@dataclass(frozen=True)
class LastStage:
    """The last stage's output for a batch of one scan, cut out of the network so that the rest
    (pooling and head) can be differentiated on its own: what Grad-CAM needs.

    Attributes:
        feats: (M, C) tensor that requires grad, one row per cell of the last stage: part of the
            trunk's graph when the trunk ran with gradient (its input requiring grad), else a leaf.
        cell_of_site: (N,) long, for each input site (in the SparseVolume's order) the row of
            `feats` whose cell covers it, through all the strides.
        head: feats -> logits (1, classes): the network after the last stage.
        pooled: for a network that also pools its input features (model.input_pooling), the (N, C)
            leaf, in site order, that the head's input pooling reads: the second feature map the
            head sees besides the last stage (its gradient flows through the pooling alone). None
            without input pooling.
    """

    feats: torch.Tensor
    cell_of_site: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]
    pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class SiteHooks:
    """How explanation methods (ctsparse/explain) reach inside an engine's network.

    Attributes:
        last_stage: (model, input of one scan, its SparseVolume) -> LastStage, the trunk run in
            the caller's grad mode (under torch.no_grad(), only the head is differentiable).
        input_sites: (input of one scan, its SparseVolume) -> (leaf, gather): `leaf`, set to
            require grad, is the tensor of input features the model reads; gather(t) turns a
            tensor shaped like it (its gradient) into (N, C) rows in site order.
    """

    last_stage: Callable[[torch.nn.Module, Any, SparseVolume], LastStage]
    input_sites: Callable[[Any, SparseVolume], tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]


@dataclass(frozen=True)
class Engine:
    """How to build, feed and check one kind of classifier.

    Attributes:
        build: (model config, input channels, classes) -> an nn.Module whose forward takes the
            output of `collate` and returns logits (B, classes); timm's forward_features /
            forward_head split is expected by the embedding and explanation code.
        collate: (SparseVolumes, device, stride multiple) -> the model's input for that batch.
        needs_me: runs on MinkowskiEngine, so CUDA is usable only when ME was built with it.
        stride_multiple: the multiple every input grid dimension is padded to (a dense network
            with stride-2 stages needs even sizes at every stage); 1 when any grid will do.
        check: probes of the installed engine for `ctsparse doctor` (never raises).
        versions: library versions worth recording in a checkpoint of this engine.
        checkpoint_fields: extra top-level fields of a checkpoint (e.g. the weight layout).
        refuse_checkpoint: (model config, raw checkpoint) -> why this engine cannot use those
            weights, or None.
        explain: the hooks saliency methods need (None: only the gradient-free ones work).
        implementation: device -> which kernels run this engine there (recorded in checkpoints
            and metrics; "" when there is nothing to say beyond the engine's name).
    """

    name: str
    build: Callable[[ModelConfig, int, int], torch.nn.Module]
    collate: Callable[[Sequence[SparseVolume], torch.device, int], Any]
    needs_me: bool = False
    stride_multiple: Callable[[ModelConfig], int] = _any_grid
    check: Callable[[], list[Check]] = _nothing_to_check
    versions: Callable[[], dict[str, str]] = _no_versions
    checkpoint_fields: Callable[[], dict[str, Any]] = _no_fields
    refuse_checkpoint: Callable[[ModelConfig, Mapping[str, Any]], str | None] = _accept
    explain: SiteHooks | None = None
    implementation: Callable[[torch.device], str] = _no_detail

    def inputs(self, svs: Sequence[SparseVolume], device: torch.device, cfg: ModelConfig) -> Any:
        """The model's input for a batch of scans, on `device` (for model.candidates: K, the K
        candidate balls of every scan, scan after scan, each aligned on the network's strides)."""
        if cfg.candidates > 0:
            from ctsparse.candidates import expand
            from ctsparse.data.augment import aligned

            svs = [aligned(b) for b in expand(svs, cfg.candidates)[0]]
        return self.collate(svs, device, self.stride_multiple(cfg))
