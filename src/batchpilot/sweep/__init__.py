"""The empirical check of a plan: the runner (:mod:`.runner`), its trial store (:mod:`.store`), the analysis (:mod:`.analysis`) and sharpness (:mod:`.sharpness`)."""
