"""JWST data-quality bit values used by NIRSpec products (stdatamodels ``dqflags``)."""

DO_NOT_USE = 1
SATURATED = 2
JUMP_DET = 4
DROPOUT = 8
OUTLIER = 16
NON_SCIENCE = 512
MSA_FAILED_OPEN = 1 << 29
REFERENCE_PIXEL = 1 << 31
