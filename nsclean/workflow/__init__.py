"""What the Snakemake rule scripts call: the per-file steps (:mod:`.steps`) and their status
records (:mod:`.pipeline`)."""
