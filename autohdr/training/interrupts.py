"""Ctrl-C and SIGTERM as a request to stop at the next safe point.

Raising ``KeyboardInterrupt`` from a signal handler lands wherever the main thread happens to be:
inside a DataLoader's worker bookkeeping (where Python reports "Exception ignored in ..." and the
interrupt is lost) or inside ``torch.save`` (a half-written file and a traceback). Instead the
handler only records the request; the trainer calls :meth:`StopRequest.check` between steps and
after each epoch, and that raises ``KeyboardInterrupt`` at a point where saving ``interrupted.pt``
is safe. A second Ctrl-C stops at once, for a step that hangs.
"""

from __future__ import annotations

import signal
from typing import Callable

import torch

from autohdr.training.distributed import SINGLE, DistContext, all_reduce_sum

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager: installs the handlers (main thread only) and restores the previous ones."""

    def __init__(self, log: Callable[[str], None], dist_ctx: DistContext = SINGLE,
                 device: torch.device | str = "cpu") -> None:
        self.signal_name: str | None = None
        self._log = log
        self._dist = dist_ctx
        self._device = torch.device(device)  # NCCL reduces CUDA tensors only
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name
        self._log(f"{self.signal_name}: finishing this step, then saving interrupted.pt "
                  f"(Ctrl-C again to stop at once)")

    @property
    def requested_here(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signal_name is not None

    def check(self, any_rank: bool | None = None) -> None:
        """Raise ``KeyboardInterrupt`` here, at a safe point, when a stop was requested.

        Under DDP all ranks must stop at the same point: pass ``any_rank``, the all-reduced
        :attr:`requested_here` from a reduction the caller already runs (the train step's), or
        leave it ``None`` for one all-reduce here (once per epoch is cheap; per step it is not).
        """
        if any_rank is None:
            any_rank = self.requested_here
            if self._dist.enabled:
                flag = torch.tensor([float(any_rank)], device=self._device)
                any_rank = bool(all_reduce_sum(flag, self._dist).item() > 0)
        if any_rank:
            raise KeyboardInterrupt
