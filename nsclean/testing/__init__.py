"""Test and demo infrastructure: the simulator with known truth (:mod:`.simulate`), the
loopback MAST server (:mod:`.mastserver`) and the offline demo (:mod:`.demo`)."""
