"""Helpers shared by the workflow tests: simulated programmes, FITS products and the run
report."""

from __future__ import annotations

import csv

import numpy as np


def read_report(results, timing=False, table="report.csv"):
    """Rows of ``<results>/<table>`` (the run's report.csv by default) as dicts.

    Without ``timing``, the time column is left out: it is the one column that differs
    between identical runs.
    """
    from nsclean.report.report import TIMING_COLUMNS

    with open(results / table, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not timing:
        for row in rows:
            for column in TIMING_COLUMNS:
                row.pop(column, None)
    return rows


def assert_same_fits(produced, expected):
    """Same HDUs, same data bit for bit, same headers except a DATE keyword."""
    from astropy.io import fits

    with fits.open(produced) as mine, fits.open(expected) as theirs:
        assert len(mine) == len(theirs), produced
        for a, b in zip(mine, theirs, strict=True):
            assert a.name == b.name
            if b.data is None:
                assert a.data is None, (produced, a.name)
            else:
                assert a.data.dtype == b.data.dtype, (produced, a.name)
                assert np.array_equal(np.asarray(a.data).view(np.uint8),
                                      np.asarray(b.data).view(np.uint8)), (produced, a.name)
            cards_a = [str(c) for c in a.header.cards if not c.keyword.startswith("DATE")]
            cards_b = [str(c) for c in b.header.cards if not c.keyword.startswith("DATE")]
            assert cards_a == cards_b, (produced, a.name)


def write_bots_exposures(directory, program, count, **options):
    """Write exposures 1 to ``count`` of observation 1 of ``program``: simulated BOTS NRS1
    rates with their calints (``options`` go to ``simulate_exposure``).

    Returns the stems and the calints paths, in exposure order.
    """
    from nsclean.testing import simulate

    stems, cals = [], []
    for exposure in range(1, count + 1):
        sim = simulate.simulate_exposure("bots", "NRS1", seed=exposure, program=program,
                                         observation=1, exposure=exposure, **options)
        _, cal = simulate.write_exposure(sim, directory)  # a BOTS rate comes with calints
        stems.append(sim.stem)
        cals.append(cal)
    return stems, cals
