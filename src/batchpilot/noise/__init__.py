"""The gradient noise scale B_simple (McCandlish et al. 2018): from micro-batches (:mod:`.microbatch`), from DDP ranks (:mod:`.ranks`)."""
