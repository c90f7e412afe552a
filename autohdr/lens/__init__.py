"""The lens model: warp geometry (:mod:`.geometry`), the network (:mod:`.model`), training losses
(:mod:`.losses`), the challenge-score proxy (:mod:`.proxy`) and correcting / scoring a subset
(:mod:`.evaluation`). Pure functions throughout, except the ``nn.Module`` of the model."""
