"""The algorithms, on numpy arrays only: the fit (:mod:`.core`), background masks
(:mod:`.masks`), QA metrics (:mod:`.qa`), the DMS/detector orientation (:mod:`.orientation`)
and the NIRSpec constants (:mod:`.nirspec`).  Nothing here reads or writes files."""
