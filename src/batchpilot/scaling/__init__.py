"""How hyperparameters move with the batch: LR rules (:mod:`.lr_rules`), LR schedules (:mod:`.lr_schedules`) and batch-size schedules (:mod:`.batch_schedules`), all pure functions."""
