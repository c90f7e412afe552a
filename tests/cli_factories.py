"""Model factories for ``autohdr debug --model-factory tests.cli_factories:NAME`` in the CLI tests."""

from __future__ import annotations

from autohdr.model import LensCorrectionModel, ModelConfig

#: A narrower, shallower network than the default (8 channels in every backbone stage).
SMALL_CONFIG = ModelConfig(widths=(8, 8, 8, 8), head_hidden=16, residual_hidden=8)


def small_model() -> LensCorrectionModel:
    """A :class:`LensCorrectionModel` with :data:`SMALL_CONFIG` (input ``(B, 3, H, W)``, H and W divisible by 16)."""
    return LensCorrectionModel(SMALL_CONFIG)


def not_a_model() -> dict:
    """A factory that returns something other than an ``nn.Module`` (a usage error)."""
    return {"params": None}


class _InterruptedWhileTraining(LensCorrectionModel):
    """Raises ``KeyboardInterrupt`` on the first training-mode forward (Ctrl-C during a step)."""

    def forward(self, image):
        if self.training:
            raise KeyboardInterrupt
        return super().forward(image)


def interrupting_model() -> LensCorrectionModel:
    """:class:`LensCorrectionModel` with :data:`SMALL_CONFIG` whose first training step is interrupted."""
    return _InterruptedWhileTraining(SMALL_CONFIG)


def raises() -> LensCorrectionModel:
    """A factory that fails (a bug in the user's code): a usage error naming it, not a traceback."""
    raise RuntimeError("factory exploded")
