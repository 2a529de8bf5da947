"""Stage-2 associations that point at the cleaned rates, for rerunning ``calwebb_spec2``.

After cleaning, stage 2 must be run again on the cleaned rate files, with the same
associations as the archive's: a NIRSpec science exposure is calibrated together with
its background and imprint (leakcal) exposures, so every member must be the *cleaned*
file, not only the science one.  Editing those associations by hand is what the
TEMPLATES team called "a huge mess".  :func:`rewrite_spec2_association` does it:

* every member whose ``expname`` is a rate (or rateints) file of an exposure
  (``science``, ``background``, ``imprint``, ``selfcal`` ...) is replaced by the path of
  that exposure's cleaned file, relative to the association's folder (stage 2 resolves
  member names against it);
* members that are not exposures' rate files are kept as they are;
* if any exposure member has no cleaned file (it failed, was skipped, or belongs to no
  processed program), the association is refused with the list, so that no stage-2 run
  silently mixes cleaned and uncleaned exposures.

Stage-2 association files are JSON (``jw<program>-o<obs>_<time>_spec2_<n>_asn.json``,
``asn_type`` ``spec2``), one product per science exposure with its ``members``.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..io.atomic import atomic_write_text
from .archive import (
    DEFAULT_ARCHIVE_URL,
    _normalise_programs,
    _observations_client,
    _retrying,
    stem_of,
)

__all__ = ["AssociationError", "find_spec2_associations", "read_association",
           "rewrite_spec2_association", "write_association"]

_SPEC2 = re.compile(r"^jw(\d{5})-o\d{3}_.*_spec2_\d+_asn\.json$", re.IGNORECASE)


class AssociationError(ValueError):
    """An association cannot be used or rewritten; the message names the file."""


def read_association(path: str | os.PathLike) -> dict:
    """Read and check a level-2 association file (JSON with ``products`` and members).

    Raises
    ------
    AssociationError
        If the file is not JSON or lacks ``products`` / ``members`` / ``expname``.
    """
    path = Path(path)
    try:
        asn = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AssociationError(f"{path}: not a readable association ({exc})") from None
    products = asn.get("products") if isinstance(asn, dict) else None
    if not isinstance(products, list) or not products:
        raise AssociationError(f"{path}: no products in the association")
    for number, product in enumerate(products):
        members = product.get("members") if isinstance(product, dict) else None
        if not isinstance(members, list) or not all(
                isinstance(m, dict) and isinstance(m.get("expname"), str) for m in members):
            raise AssociationError(f"{path}: product {number} has no list of members with "
                                   "expname")
    return asn


def _exposure_of(expname: str) -> str | None:
    name = Path(expname).name
    if not name.endswith(("_rate.fits", "_rateints.fits")):
        return None
    try:
        return stem_of(name)
    except ValueError:
        return None


def rewrite_spec2_association(asn: Mapping, cleaned: Mapping[str, str | os.PathLike],
                              directory: str | os.PathLike, *, source: str = "") -> dict:
    """A copy of a stage-2 association whose exposure members are the cleaned files.

    Parameters
    ----------
    asn : mapping
        The association (as :func:`read_association` returns it); not modified.
    cleaned : mapping
        Exposure stem (or, for the segments of a time series, the rateints file name)
        -> cleaned file, for every exposure that was cleaned.
    directory : path
        Folder the rewritten association will be written to; member paths are made
        relative to it.
    source : str
        Name of the original file, for messages and the ``nsclean`` record.

    Returns
    -------
    dict
        The rewritten association; it gains ``"nsclean": {"source": ..., "members":
        {old expname: new expname}}``.

    Raises
    ------
    AssociationError
        Naming every exposure member that has no cleaned file.
    """
    rewritten = copy.deepcopy(dict(asn))
    directory = Path(directory)
    missing, renamed = [], {}
    for product in rewritten["products"]:
        for member in product["members"]:
            stem = _exposure_of(member["expname"])
            if stem is None:
                continue
            # by file name first: each segment of a time series has its own cleaned file
            target = cleaned.get(Path(member["expname"]).name) or cleaned.get(stem)
            if target is None:
                missing.append(f"{member.get('exptype', 'member')} {member['expname']}")
                continue
            new = os.path.relpath(os.path.abspath(target), os.path.abspath(directory))
            renamed[member["expname"]] = new.replace(os.sep, "/")
            member["expname"] = renamed[member["expname"]]
    if missing:
        raise AssociationError(f"{source or 'association'}: not every member is cleaned, "
                               f"so stage 2 would mix cleaned and uncleaned exposures: "
                               f"{'; '.join(missing)}")
    rewritten["nsclean"] = {"source": source, "members": renamed}
    return rewritten


def write_association(asn: Mapping, path: str | os.PathLike) -> Path:
    """Write an association as JSON, atomically."""
    atomic_write_text(path, json.dumps(asn, indent=2) + "\n")
    return Path(path)


def find_spec2_associations(programs, *, source: str = "mast", local_dir=None,
                            archive_url: str = DEFAULT_ARCHIVE_URL, timeout: float = 120.0,
                            retries: int = 3, backoff: float = 2.0) -> list[dict]:
    """The stage-2 (``spec2``) association files of programs, from MAST or a directory.

    With ``source="mast"`` the program's observations are queried with astroquery and
    their ``ASN`` products kept (see :func:`nsclean.archive.archive.configure_mast_server`
    for the import-time caveat); with ``"local"``, ``local_dir`` is searched for
    ``jw<program>-o<obs>_..._spec2_<n>_asn.json``.

    Returns
    -------
    list of dict
        ``productFilename``, ``dataURI`` and ``size`` of each file, sorted by name.
    """
    wanted = set(_normalise_programs(programs))
    found: dict[str, dict] = {}
    if source == "local":
        for path in sorted(Path(local_dir).glob("jw*_spec2_*_asn.json")):
            match = _SPEC2.match(path.name)
            if match and match.group(1) in wanted:
                found[path.name] = {"productFilename": path.name,
                                    "dataURI": path.resolve().as_uri(),
                                    "size": path.stat().st_size}
        return [found[name] for name in sorted(found)]
    client = _observations_client(archive_url, timeout)
    proposal_ids = [str(int(p)) for p in wanted]
    observations = _retrying(
        lambda: client.query_criteria(obs_collection="JWST", proposal_id=proposal_ids,
                                      calib_level=[3]),
        f"observation query for programs {','.join(proposal_ids)}", retries=retries,
        backoff=backoff)
    obsids = sorted({str(row["obsid"]) for row in observations})
    for start in range(0, len(obsids), 200):
        chunk = obsids[start:start + 200]
        table = _retrying(lambda chunk=chunk: client.get_product_list(chunk),
                          f"product list for {len(chunk)} observations", retries=retries,
                          backoff=backoff)
        table = client.filter_products(table, productSubGroupDescription=["ASN"])
        for row in table:
            name = str(row["productFilename"])
            match = _SPEC2.match(name)
            if match and match.group(1) in wanted:
                found[name] = {"productFilename": name, "dataURI": str(row["dataURI"]),
                               "size": int(row["size"])}
    return [found[name] for name in sorted(found)]
