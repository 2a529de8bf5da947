"""NIRSpec detector facts used across the package, each defined once here.

Frame geometry (field notes section 2 and 3): full frames are 2048 x 2048 pixels with a
4-pixel reference border; the four output channels are 512-row strips in DMS orientation;
the fixed slits illuminate DMS rows 922-1115 on both detectors.  The data-quality bits are the
stdatamodels ``dqflags`` values used by NIRSpec products.
"""

#: The two NIRSpec detectors, as the DETECTOR keyword spells them.
DETECTORS = ("NRS1", "NRS2")
#: Full-frame size of the NIRSpec detectors (pixels per side).
FULL_FRAME = 2048
#: Width of the reference-pixel border of a full frame.
REFERENCE_BORDER = 4
#: Rows of one output channel in DMS orientation (4 outputs on a full frame).
CHANNEL_ROWS = 512
#: Number of output channels of a full frame.
N_CHANNELS = FULL_FRAME // CHANNEL_ROWS
#: Pause between fast-scan lines, in pixel clock ticks (10 us each): places subarray
#: pixels on the read-out time axis.
LINE_OVERHEAD_TICKS = 12
#: DMS rows (0-indexed, inclusive) that the fixed slits illuminate on both detectors; the jwst
#: pipeline masks the same rows for IFU and MOS exposures.
FIXED_SLIT_ROWS = (922, 1115)

# --- data-quality bits (stdatamodels dqflags) ----------------------------------------------
DO_NOT_USE = 1
SATURATED = 2
JUMP_DET = 4
DROPOUT = 8
OUTLIER = 16
NON_SCIENCE = 512
HOT = 2048
MSA_FAILED_OPEN = 1 << 29
REFERENCE_PIXEL = 1 << 31
