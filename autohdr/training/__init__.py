"""Training: the typed config and stages (:mod:`.config`), the loop (:mod:`.trainer`), atomic
checkpoints (:mod:`.checkpoint`), Ctrl-C / SIGTERM handling (:mod:`.interrupts`) and torchrun
(:mod:`.distributed`)."""
