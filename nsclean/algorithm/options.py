"""Every option of the cleaner and of the automatic background mask, declared once.

Each :class:`Option` gives an option's name, default, type, help text and allowed values,
its command-line flag and the FITS keyword that records it in products.  Everything else
is derived from these two tables:

- the defaults of :func:`nsclean.fit` (``nsclean.algorithm.core._DEFAULTS``) and of
  :class:`nsclean.algorithm.masks.MaskOptions`;
- the options of ``nsclean clean`` and ``nsclean mask`` (:mod:`nsclean.cli`);
- the FITS keywords of masks and cleaned files (:mod:`nsclean.io.exposure`);
- the option tables of the README and docs/workflow.md (``python -m
  nsclean.algorithm.options markdown clean|mask`` prints them; a test keeps them current);

and ``tests/test_options.py`` checks the ``clean`` and ``mask`` sections of
``workflow/schemas/config.schema.yaml`` against :func:`json_schema` (``python -m
nsclean.algorithm.options schema clean|mask`` prints them).

To add an option, append an :class:`Option` to :data:`CLEAN_OPTIONS` (or
:data:`MASK_OPTIONS`), then paste the printed schema section and table into the schema
and the docs; the cleaner's code reads it from its options dictionary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .nirspec import FIXED_SLIT_ROWS, FULL_FRAME

__all__ = ["CLEAN_OPTIONS", "MASK_OPTIONS", "Option", "defaults", "json_schema",
           "markdown_table", "schema_yaml"]

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


@dataclass(frozen=True)
class Option:
    """One option of the cleaner or of the mask.

    Parameters
    ----------
    name : str
        The keyword argument / config key.
    default : object
        The default value.
    type : type
        ``bool``, ``int``, ``float`` or ``str``: the type of a value (of each item for a
        list option).
    help : str
        One or two sentences for the docs, the config schema and ``--help``.
    choices : tuple, optional
        The allowed values of a ``str`` option.
    nullable : bool
        ``None`` is allowed (it turns the feature off).
    minimum, exclusive_minimum, maximum : float, optional
        Bounds of a number (of each item for a list option).
    length : int, optional
        The option is a list of exactly this many values.
    flag : str or None
        Command-line flag; ``""`` (default) means ``--<name with dashes>``, None means
        not on the command line.
    invert : bool
        For a ``bool`` option: the flag is a switch that sets the option to False
        (``--keep-failed-open``) instead of a ``--x/--no-x`` pair.
    metavar : str or tuple, optional
        Placeholder of the value in ``--help``.
    keyword, comment : str, optional
        FITS keyword (and its card comment) recording the option in products.
    """

    name: str
    default: Any
    type: type
    help: str
    choices: tuple = ()
    nullable: bool = False
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    length: int | None = None
    flag: str | None = ""
    invert: bool = False
    metavar: str | tuple | None = None
    keyword: str | None = None
    comment: str = ""

    @property
    def cli_flag(self) -> str | None:
        """The command-line flag, or None."""
        if self.flag is None:
            return None
        return self.flag or "--" + self.name.replace("_", "-")


#: Options of :func:`nsclean.fit` / :func:`nsclean.clean` (config section ``clean``).
CLEAN_OPTIONS = (
    Option("method", "auto", str,
           "readout: the conditional mean of the noise at every pixel on each line's "
           "(output, clock tick) grid, with a prior measured on the exposure (on subarrays "
           "kriging along the read-out time series; it returns the posterior variance); "
           "fft: the paper's Fourier model fitted along each detector line; median: "
           "subtract each column's background median (for comparison; it cannot follow "
           "the picture frame); auto: readout on full frames and on subarrays of lines of "
           "at most 64 pixels (the 32-row BOTS and fixed-slit subarrays), fft on taller "
           "subarrays.",
           choices=("auto", "readout", "fft", "median"), keyword="NSCFMETH",
           comment="fit method"),
    Option("max_modes", 32, int,
           "Readout method: most common modes per line (the per-output part gets half); the "
           "data choose fewer where the prior carries no useful power.",
           minimum=1, metavar="N", keyword="NSCFMODS",
           comment="readout: most common modes per line"),
    Option("share_lines", True, bool,
           "Readout method: give every line a prior mean from its neighbours (the picture "
           "frame and the slowest 1/f change smoothly from line to line).",
           keyword="NSCFSHAR", comment="readout: prior mean from neighbouring lines"),
    Option("variance", True, bool,
           "Readout method: compute the posterior variance of the noise model at every "
           "pixel; cleaned files then have it added to VAR_RNOISE, and ERR recomputed.",
           keyword="NSCFVAR", comment="readout: model variance in VAR_RNOISE and ERR"),
    Option("mode", "auto", str,
           "line: each fast-scan line on its own (full frames); timeseries: the subarray as "
           "one read-out time series, in overlapping chunks; auto: line for lines of 1024 "
           "pixels or more.",
           choices=("auto", "line", "timeseries"), keyword="NSCFMODE",
           comment="fit mode: auto, line, timeseries"),
    Option("cutoff", 1.0 / 256.0, float,
           "Apodizer cut-off, cycles per pixel along a line: 1/256 keeps gain 1 for "
           "frequencies 0-7 of a 2048-pixel line, 0.5 at 8, 0 from 9.",
           exclusive_minimum=0, maximum=0.5, metavar="CYCLES_PER_PIX", keyword="NSCFCUT",
           comment="[1/pix] apodizer cut-off frequency"),
    Option("rolloff", 1.0 / 1024.0, float,
           "Width of the apodizer's cosine roll-off, cycles per pixel.",
           minimum=0, metavar="CYCLES_PER_PIX", keyword="NSCFROLL",
           comment="[1/pix] apodizer roll-off width"),
    Option("weight_sigma", 32.0, float,
           "Sigma (pixels) of the Gaussian measuring the local background density along a "
           "line; the weights are density^-2.",
           exclusive_minimum=0, metavar="PIX", keyword="NSCFWSIG",
           comment="[pix] density-weight Gaussian sigma"),
    Option("outlier_sigma", 3.0, float,
           "Background pixels whose residual exceeds this many robust sigma are dropped "
           "and the line refitted; null (None) disables the rejection.",
           nullable=True, exclusive_minimum=0, metavar="NSIGMA", keyword="NSCFOSIG",
           comment="outlier rejection [robust sigma]"),
    Option("outlier_iterations", 1, int, "Number of reject-and-refit passes.",
           minimum=0, metavar="N", keyword="NSCFOITR",
           comment="outlier reject-and-refit passes"),
    Option("max_model_variance", 0.25, float,
           "Guard: largest variance the fit may add to a pixel, in units of the white-noise "
           "variance; lines above it are refitted with fewer frequencies. null (None) "
           "disables the guard.",
           nullable=True, exclusive_minimum=0, metavar="FRACTION", keyword="NSCFMVAR",
           comment="guard: max model variance [sigma^2]"),
    Option("smooth_sigma", 0.0, float,
           "Gaussian sigma (lines) smoothing the model across lines; 0 disables it (the "
           "jwst port's 'buff' is 1.5).",
           minimum=0, metavar="LINES", keyword="NSCFSMOO",
           comment="[lines] model smoothing sigma"),
    Option("per_channel", False, bool,
           "With method median, one median per 512-row output channel.",
           keyword="NSCFPCH", comment="median method: per output channel"),
    Option("chunk_length", 2048, int,
           "Time-series mode: chunk length in pixel-clock ticks.",
           minimum=64, metavar="TICKS", keyword="NSCFCHNK",
           comment="[ticks] time-series chunk length"),
    Option("adaptive", True, bool,
           "Scale each fitted frequency by a Wiener gain from the correlated power this "
           "exposure has there, so that poorly constrained terms are shrunk instead of "
           "subtracted; false gives the paper's plain apodizer.",
           keyword="NSCFADPT", comment="Wiener gains per frequency (adaptive)"),
)

#: Options of :class:`nsclean.algorithm.masks.MaskOptions` (config section ``mask``).
MASK_OPTIONS = (
    Option("use_footprint", True, bool,
           "Remove the science footprint taken from the cal product.",
           flag=None, keyword="NSCMFOOT", comment="science footprint from cal removed"),
    Option("footprint_mode", "trace", str,
           "Slit products (MOS, fixed slit, BOTS): trace removes the pixels the pipeline "
           "calibrated (finite in the cal file), box the whole slit bounding box. IFU "
           "footprints are always the finite pixels of the cal file.",
           choices=("trace", "box"), flag="--footprint", keyword="NSCMFMOD",
           comment="slit footprint: trace or box"),
    Option("dilation_radius", 2, int,
           "Radius (pixels) of the disk growing the footprint, to keep light in the PSF "
           "wings out of the fit; 0 = none.",
           minimum=0, flag="--dilate", metavar="PIX", keyword="NSCMDIL",
           comment="[pix] footprint dilation radius"),
    Option("fixed_slit_band", "auto", str,
           "Remove the rows lit by the always-open fixed slits: always, never, or auto (IFU "
           "and MOS full frames only).",
           choices=("auto", "always", "never"), keyword="NSCMFSB",
           comment="fixed-slit band: auto, always, never"),
    Option("fixed_slit_rows", list(FIXED_SLIT_ROWS), int,
           "First and last (inclusive, 0-indexed, as in the jwst pipeline) full-frame DMS "
           "row of the fixed-slit band.",
           minimum=0, maximum=FULL_FRAME - 1, length=2, metavar=("FIRST", "LAST")),
    Option("mask_nan", True, bool, "Remove pixels that are NaN in the rate image.",
           flag=None, keyword="NSCMNAN", comment="NaN pixels removed"),
    Option("mask_do_not_use", True, bool, "Remove pixels flagged DO_NOT_USE.",
           flag=None, keyword="NSCMDNU", comment="DO_NOT_USE pixels removed"),
    Option("mask_reference_pixels", True, bool,
           "Remove the 4-pixel reference border (by position and by the REFERENCE_PIXEL "
           "flag).",
           flag=None, keyword="NSCMREF", comment="reference border removed"),
    Option("mask_failed_open", True, bool,
           "Remove pixels flagged MSA_FAILED_OPEN (light from stuck-open shutters).",
           flag="--keep-failed-open", invert=True, keyword="NSCMMSA",
           comment="MSA_FAILED_OPEN pixels removed"),
    Option("mask_jump", True, bool,
           "Remove pixels flagged JUMP_DET (cosmic rays, snowball halos), which leave "
           "positive residuals in the rate (docs/masks.md).",
           flag="--mask-jumps", keyword="NSCMJUMP", comment="JUMP_DET pixels removed"),
    Option("jump_fallback", True, bool,
           "Keep the jump pixels of any column that masking them would leave weak.",
           keyword="NSCMJFB", comment="jumps kept where masking them weakens a column"),
    Option("clip_sigma", 4.0, float,
           "Remove pixels this many robust sigma above their column's background level; "
           "null (None) or 0 = no clipping.",
           nullable=True, minimum=0, flag="--clip", metavar="NSIGMA", keyword="NSCMCLIP",
           comment="bright clip [robust sigma], 0 = off"),
    Option("guard_min_pixels", 34, int,
           "Columns with fewer background pixels than this are reported as weak (capped at "
           "a quarter of the column length for short subarrays).",
           minimum=0, metavar="N", keyword="NSCMGMIN",
           comment="guard: min background pixels per column"),
    Option("guard_max_gap", 500, int,
           "Columns whose longest run of masked pixels exceeds this are reported as weak: "
           "the model is poorly constrained inside long gaps.",
           minimum=0, metavar="PIX", keyword="NSCMGGAP",
           comment="[pix] guard: longest masked run allowed"),
)

_SECTIONS = {"clean": CLEAN_OPTIONS, "mask": MASK_OPTIONS}


def defaults(options) -> dict:
    """``{name: default}`` of a table of options (lists copied)."""
    return {o.name: list(o.default) if isinstance(o.default, list) else o.default
            for o in options}


def json_schema(option: Option) -> dict:
    """The JSON-schema property of an option, as in workflow/schemas/config.schema.yaml."""
    bounds = {key: value for key, value in (("minimum", option.minimum),
                                            ("exclusiveMinimum", option.exclusive_minimum),
                                            ("maximum", option.maximum))
              if value is not None}
    json_type = _JSON_TYPES[option.type]
    prop: dict = {"description": option.help}
    if option.length is not None:
        prop.update(type="array", items={"type": json_type, **bounds},
                    minItems=option.length, maxItems=option.length)
    else:
        prop["type"] = [json_type, "null"] if option.nullable else json_type
        if option.choices:
            prop["enum"] = list(option.choices)
        prop.update(bounds)
    prop["default"] = option.default
    return prop


def _default_text(option: Option) -> str:
    if option.length is not None:
        return "[" + ", ".join(map(str, option.default)) + "]"
    if option.type is bool:
        return "true" if option.default else "false"
    if option.type is str:
        return f"`{option.default}`"
    if option.name in ("cutoff", "rolloff"):
        return f"1/{round(1 / option.default)}"
    return f"{option.default:g}" if isinstance(option.default, float) else str(option.default)


def markdown_table(options) -> str:
    """The options as a Markdown table (key, default, meaning), for the docs."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for option in options:
        lines.append(f"| `{option.name}` | {_default_text(option)} | {option.help} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m nsclean.algorithm.options markdown|schema clean|mask``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nsclean.algorithm.options",
                                     description="Print the docs table or the config "
                                     "schema section of the cleaner or mask options.")
    parser.add_argument("what", choices=("markdown", "schema"))
    parser.add_argument("section", choices=tuple(_SECTIONS))
    args = parser.parse_args(argv)
    options = _SECTIONS[args.section]
    if args.what == "markdown":
        print(markdown_table(options), end="")
    else:
        print(schema_yaml(options), end="")
    return 0


def schema_yaml(options, indent: int = 0) -> str:
    """The options' JSON-schema properties as YAML (lists of values inline), indented."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def represent_list(self, data):
            flow = all(not isinstance(item, (dict, list)) for item in data)
            return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, Dumper.represent_list)
    properties = {o.name: json_schema(o) for o in options}
    text = yaml.dump(properties, Dumper=Dumper, sort_keys=False, width=88 - indent,
                     default_flow_style=False)
    return "".join(" " * indent + line if line.strip() else line
                   for line in text.splitlines(True))


if __name__ == "__main__":
    raise SystemExit(main())
