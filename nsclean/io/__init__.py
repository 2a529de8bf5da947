"""Files: rate/cal readers, mask and cleaned-product writers with provenance
(:mod:`.exposure`), the input error that names the file (:mod:`.errors`) and the atomic
writer every product goes through (:mod:`.atomic`)."""
