"""Model factories for ``autohdr debug --model-factory tests.cli_factories:NAME`` in the CLI tests."""

from __future__ import annotations

import os
import signal

from autohdr.lens.model import LensCorrectionModel, ModelConfig

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


class _SigtermOnRankOne(LensCorrectionModel):
    """Under torchrun, rank 1 alone receives SIGTERM during its ``at_step``-th training forward."""

    def __init__(self, at_step: int) -> None:
        super().__init__()
        self._forwards, self._at_step = 0, at_step

    def forward(self, image):
        if self.training:
            self._forwards += 1
            if self._forwards == self._at_step and os.environ.get("RANK") == "1":
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(image)


def sigterm_on_rank_one() -> LensCorrectionModel:
    """The default model; rank 1 is sent SIGTERM in its 3rd training step (rank 0 is not)."""
    return _SigtermOnRankOne(at_step=3)
