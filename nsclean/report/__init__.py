"""QA figures (:mod:`.figures`) and the HTML/CSV report of a run (:mod:`.report`)."""
