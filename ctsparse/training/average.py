"""An exponential moving average of a model's weights (train.ema_epochs).

The average is a second instance of the network, updated after every optimizer step:
w_avg <- decay * w_avg + (1 - decay) * w. BatchNorm's running statistics are averaged alike, so
the averaged network is evaluated with statistics of the same period as its weights; integer
buffers (BatchNorm's step counter) are copied. Kept as a model of its own rather than through
torch's AveragedModel, which deep-copies the network: MinkowskiEngine's layers lose attributes
in a deep copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class WeightAverage:
    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.module = module.eval()  # only ever evaluated and saved
        self.decay = decay
        self.n = 0  # updates so far; the first one copies the weights

    @classmethod
    def of(
        cls, build: Callable[[], torch.nn.Module], ema_epochs: float | None, steps: int
    ) -> WeightAverage | None:
        """None without ema_epochs; else a decay per step whose horizon, 1 / (1 - decay) steps,
        is ema_epochs epochs of `steps` steps."""
        if ema_epochs is None:
            return None
        return cls(build(), max(0.0, 1.0 - 1.0 / (ema_epochs * max(1, steps))))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        mine, theirs = self.module.state_dict(), model.state_dict()
        for key, avg in mine.items():
            new = theirs[key].detach().to(avg.device)
            if self.n == 0 or not avg.is_floating_point():
                avg.copy_(new)
            else:
                avg.lerp_(new, 1.0 - self.decay)
        self.n += 1

    def state_dict(self) -> dict[str, Any]:
        weights = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        return {"n": self.n, "weights": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.n = int(state["n"])
