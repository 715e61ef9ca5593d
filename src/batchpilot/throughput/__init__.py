"""Throughput: measured step time T(B) with its fitted model and MFU (:mod:`.measure`), peak FLOP/s (:mod:`.peak_flops`)."""
