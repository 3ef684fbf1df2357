"""A host's model lent to a run: nested sessions, and the weights' flags given back as they were found.

The WebUI backends (ldm and sgm in A1111, Forge's) train a model they do not own. Each `training_session`
freezes it and gives it back exactly as found, however the run ends; a probe or a report inside a run opens
a session again, and only the outermost one may record and restore.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


class SessionDepth:
    """How deep the sessions over one borrowed model are nested."""

    def __init__(self):
        self.depth = 0

    @contextlib.contextmanager
    def enter(self, outermost: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
        """A session: the outermost one runs inside `outermost()` (which records and restores); nested ones
        only count."""
        if self.depth:
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
            return
        self.depth = 1
        try:
            with outermost():
                yield
        finally:
            self.depth = 0


@contextlib.contextmanager
def frozen_as_found(model: torch.nn.Module, attributes: list[tuple[object, str]] = ()) -> Iterator[None]:
    """Every weight of `model` frozen for the block (no weight gradients are computed or stored); afterwards
    the listed `(owner, name)` attributes (the token-embedding layers a host wraps), each weight's
    requires_grad, which weights held no gradient, and every module's train/eval flag, as they were."""
    parameters = list(model.parameters())
    requires_grad = [parameter.requires_grad for parameter in parameters]
    had_grad = [parameter.grad is not None for parameter in parameters]
    modes = [(module, module.training) for module in model.modules()]
    values = [getattr(owner, name) for owner, name in attributes]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for (owner, name), value in zip(attributes, values):
            setattr(owner, name, value)
        for parameter, flag, had in zip(parameters, requires_grad, had_grad):
            parameter.requires_grad_(flag)
            if not had:
                parameter.grad = None
        for module, training in modes:
            module.training = training
