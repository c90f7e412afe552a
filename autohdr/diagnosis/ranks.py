"""Where this process stands in a torch.distributed job, and gathering a value from every rank.

The diagnosis layer needs only this much of distributed training (each rank's parameter checksum);
process groups, reductions and launching live in :mod:`autohdr.training.distributed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def gather_objects(value, ctx: DistContext) -> list:
    """Every rank's ``value`` as a list indexed by rank (``[value]`` for one process)."""
    if not ctx.enabled:
        return [value]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out
