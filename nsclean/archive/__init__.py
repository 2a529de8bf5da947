"""Finding and fetching rate and cal files: the MAST query through astroquery, a local
directory as archive, the manifest and the downloads (:mod:`.archive`)."""
