"""Exceptions shared by the I/O layer, the command line and the workflow."""

from __future__ import annotations

import os


class NSCleanInputError(ValueError):
    """An input file cannot be used: the message names the file and the problem.

    Parameters
    ----------
    path : str or os.PathLike or None
        The offending file (``None`` when the problem is not tied to one file).
    problem : str
        One line saying what is wrong, in words an astronomer can act on.

    Examples
    --------
    >>> str(NSCleanInputError("a_rate.fits", "no DQ extension"))
    'a_rate.fits: no DQ extension'
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(problem).split())
        message = self.problem if self.path is None else f"{self.path}: {self.problem}"
        super().__init__(message)
