"""Rank sync: are all ranks of a torch.distributed job training the same model?

Writes, under DDP (``world_size > 1``), ``rank_param_checksums`` (every rank's
:func:`parameter_checksum`) and ``rank_probe_checksums`` (every rank's probe prediction checksum) in
each ``val_epoch`` record; ``ranks_in_sync`` judges them. One gather of a small object per
validation, nothing per step. State: none.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from autohdr.diagnosis.checksum import tensor_checksum
from autohdr.diagnosis.observers.base import Observer
from autohdr.diagnosis.ranks import DistContext, gather_objects


def parameter_checksum(model: nn.Module, decimals: int) -> str:
    """Digest of every parameter and floating-point buffer (batch-norm statistics), rounded to
    ``decimals`` (the probe's precision plus two), to compare ranks and runs."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])
    return tensor_checksum(flat, decimals)


class RankSyncObserver(Observer):
    """Every rank's parameter and probe checksums, gathered at each validation."""

    name = "rank_sync"

    def __init__(self, dist: DistContext, checksum: Callable[[], str]) -> None:
        self.dist = dist
        self._checksum = checksum

    def validation_fields(self, record: dict) -> dict:
        """``rank_param_checksums`` (and ``rank_probe_checksums``) for ``record`` (empty on one process)."""
        if not self.dist.enabled:
            return {}
        mine = (record.get("param_checksum") or self._checksum(), record.get("probe_pred_checksum"))
        gathered = gather_objects(mine, self.dist)
        out = {"rank_param_checksums": [g[0] for g in gathered]}
        if mine[1] is not None:
            out["rank_probe_checksums"] = [g[1] for g in gathered]
        return out
