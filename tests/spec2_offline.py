"""What calwebb_spec2 needs to run here, without CRDS reference files or a network.

- :func:`pipeline_product`: the simulator writes rates with astropy only; the pipeline
  reads the ASDF extension and the grating-wheel tilts that real rates carry, so a
  simulated rate is saved again through stdatamodels with them (and with the pointing
  of a real NIRSpec exposure, jw01345062001_03101_00001_nrs2, for a run with CRDS).
- :func:`offline_steps`: every Spec2Pipeline step skipped except ``imprint_subtract``
  and ``bkg_subtract``, the two that read the association's other members and need no
  reference file for NIRSpec.  ``assign_wcs`` needs CRDS references, and without it
  Spec2Pipeline makes no product at all; its post-hook :func:`wcs_assigned` stands in
  for it.
- :func:`crds_configuration_only`: a CRDS cache that holds only the configuration a
  ``crds sync`` writes (no rules, no reference files).  jwst asks CRDS for the context's
  name when a pipeline ends, even when no step used a reference file, and CRDS ends the
  process (``sys.exit``) when it has neither a server nor this file.
"""

from __future__ import annotations

import socket
from pathlib import Path

#: Observation time and pointing from a real product's header (jw01345062001_03101_00001_nrs2).
POINTING = {"date_obs": "2022-12-21", "time_obs": "07:11:21.389",
            "expstart": 59934.29955311122, "expmid": 59934.30554738895,
            "expend": 59934.31154166667}
WCSINFO = {"v2_ref": 378.563202, "v3_ref": -428.402832, "v3yangle": 138.5745697,
           "vparity": -1, "roll_ref": -49.272773635753765, "ra_ref": 214.8501915189834,
           "dec_ref": 52.85994941325347}


def pipeline_product(rate: Path) -> Path:
    """Save a simulated rate again (in place) as the pipeline writes its products."""
    from stdatamodels.jwst import datamodels

    with datamodels.open(rate) as model:
        model.meta.instrument.gwa_xtilt = 0.3381854300000057
        model.meta.instrument.gwa_ytilt = 0.03202781450000032
        model.meta.observation.date = POINTING["date_obs"]
        model.meta.observation.time = POINTING["time_obs"]
        model.meta.exposure.start_time = POINTING["expstart"]
        model.meta.exposure.mid_time = POINTING["expmid"]
        model.meta.exposure.end_time = POINTING["expend"]
        for name, value in WCSINFO.items():
            setattr(model.meta.wcsinfo, name, value)
        model.save(rate)
    return rate


def wcs_assigned(model):
    """Post-hook of the skipped ``assign_wcs``: marks it done so that the pipeline goes
    on to the steps that read the other members (it stands in for CRDS's references)."""
    model.meta.cal_step.assign_wcs = "COMPLETE"
    return model


def offline_steps() -> dict:
    """Spec2Pipeline step parameters for a run without reference files."""
    from jwst.pipeline import Spec2Pipeline

    steps = {name: {"skip": True} for name in Spec2Pipeline.step_defs
             if name not in ("imprint_subtract", "bkg_subtract", "clean_flicker_noise")}
    steps["assign_wcs"]["post_hooks"] = ["spec2_offline.wcs_assigned"]
    # bkg_subtract reads its BKG and WAVELENGTHRANGE references for WFSS and SOSS only;
    # 'N/A' overrides keep stpipe from asking CRDS for them.
    steps["bkg_subtract"] = {"override_bkg": "N/A", "override_wavelengthrange": "N/A"}
    return steps


def crds_configuration_only(directory: Path) -> Path:
    """A CRDS cache folder with only ``config/jwst/server_config``."""
    config = Path(directory) / "config" / "jwst" / "server_config"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(repr({"observatory": "jwst", "operational_context": "jwst_0000.pmap",
                            "edit_context": "jwst_0000.pmap", "force_remote_mode": False,
                            "bad_files": "", "bad_files_list": [],
                            "last_synced": "2026-12-01 00:00:00"}))
    return Path(directory)


def closed_port_url() -> str:
    """A loopback URL nothing listens on: a CRDS server that cannot be reached."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://localhost:{port}"
