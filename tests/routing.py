"""The router logits of a model's plain-path calls, to tell which expert choices a tolerance decides."""

from __future__ import annotations

import torch
from torch import nn


class RouterLog:
    """Records each layer's router (feed_forward.gate) output while open: `with RouterLog(model) as log:
    ...`, then log.logits() -> [T, n_layers, n_experts] fp32, tokens in the order they went through. Only
    the plain path calls the router as a module (the fused decode step routes in C), and a call from
    another layer's feed-forward (experts.OffloadedMoe predicting the next layer's experts) is not its
    routing, so it is left out."""

    def __init__(self, model: nn.Module) -> None:
        self._calls: list[list[torch.Tensor]] = [[] for _ in model.layers]
        self._active: int | None = None  # the layer whose feed-forward is running
        self._hooks = []
        for i, layer in enumerate(model.layers):
            ff = layer.feed_forward
            if not hasattr(ff, "gate"):
                continue  # a dense feed-forward: nothing to record
            self._hooks += [ff.register_forward_pre_hook(self._enter(i)), ff.register_forward_hook(self._leave),
                            ff.gate.register_forward_hook(self._record(i))]

    def _enter(self, layer: int):
        def enter(_module: nn.Module, _inputs: tuple) -> None:
            self._active = layer

        return enter

    def _leave(self, _module: nn.Module, _inputs: tuple, _output: object) -> None:
        self._active = None

    def _record(self, layer: int):
        def record(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if self._active == layer:
                self._calls[layer].append(output.detach().float())

        return record

    def __enter__(self) -> RouterLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        for hook in self._hooks:
            hook.remove()

    def logits(self) -> torch.Tensor:
        return torch.stack([torch.cat(calls) for calls in self._calls], dim=1)
