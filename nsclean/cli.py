"""Command line: ``nsclean mask``, ``nsclean clean`` and ``nsclean png2mask``.

Every failure prints one line ``nsclean: error: <file>: <problem>`` on
standard error and exits with a non-zero status; no partial output is left.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .algorithm.masks import MaskOptions
from .algorithm.nirspec import FIXED_SLIT_ROWS
from .io.errors import NSCleanInputError

EXIT_OK = 0
EXIT_INPUT = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3

_DEFAULTS = MaskOptions()

_DESCRIPTION = """\
Remove correlated read noise (1/f vertical banding, "picture frame") from JWST
NIRSpec count-rate images (_rate.fits) with the NSClean algorithm (Rauscher 2024).
The noise is fitted on background pixels only; a background mask says which
pixels are dark. Typical use, one exposure:

  nsclean mask  jw..._nrs1_cal.fits jw..._nrs1_rate.fits -o jw..._nrs1_mask.fits
  nsclean clean jw..._nrs1_rate.fits --mask jw..._nrs1_mask.fits -o cleaned/jw..._nrs1_rate.fits
"""


def _add_mask_options(parser: argparse.ArgumentParser, note: str = "") -> None:
    group = parser.add_argument_group(
        "automatic mask",
        "How the background mask is built from the cal and rate files. Defaults are in "
        "brackets." + note,
    )
    group.add_argument(
        "--footprint",
        choices=("trace", "box", "none"),
        default="trace",
        help="science footprint removed from the background: 'trace' = pixels the pipeline "
        "calibrated (finite in the cal file), 'box' = whole slit boxes (MOS, FS, BOTS), "
        "'none' = do not use the cal footprint [trace]",
    )
    group.add_argument(
        "--dilate",
        type=int,
        metavar="PIX",
        default=_DEFAULTS.dilation_radius,
        help="grow the footprint by this many pixels to keep light in the PSF wings out of "
        f"the fit [{_DEFAULTS.dilation_radius}]",
    )
    group.add_argument(
        "--fixed-slit-band",
        choices=("auto", "always", "never"),
        default="auto",
        help="mask the rows lit by the always-open fixed slits; 'auto' = IFU and MOS full "
        "frames only [auto]",
    )
    group.add_argument(
        "--fixed-slit-rows",
        type=int,
        nargs=2,
        metavar=("FIRST", "LAST"),
        default=list(FIXED_SLIT_ROWS),
        help="first and last full-frame row (0-indexed, as in the jwst pipeline) of the "
        f"fixed-slit band [{FIXED_SLIT_ROWS[0]} {FIXED_SLIT_ROWS[1]}]",
    )
    group.add_argument(
        "--mask-jumps",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.mask_jump,
        help="mask pixels flagged JUMP_DET (cosmic rays, snowball halos), which leave "
        "positive residuals in the rate [yes]",
    )
    group.add_argument(
        "--jump-fallback",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.jump_fallback,
        help="keep the jump pixels of columns that masking them would leave with too little "
        "background [yes]",
    )
    group.add_argument(
        "--keep-failed-open",
        action="store_true",
        help="do not mask pixels flagged MSA_FAILED_OPEN (light from stuck-open shutters)",
    )
    group.add_argument(
        "--clip",
        type=float,
        metavar="NSIGMA",
        default=_DEFAULTS.clip_sigma,
        help="mask remaining pixels this many robust sigma above their column's background "
        f"level; 0 = off [{_DEFAULTS.clip_sigma:g}]",
    )
    group.add_argument(
        "--guard-min-pixels",
        type=int,
        metavar="N",
        default=_DEFAULTS.guard_min_pixels,
        help="report columns with fewer background pixels than this "
        f"[{_DEFAULTS.guard_min_pixels}]",
    )
    group.add_argument(
        "--guard-max-gap",
        type=int,
        metavar="PIX",
        default=_DEFAULTS.guard_max_gap,
        help="report columns whose longest masked run is longer than this "
        f"[{_DEFAULTS.guard_max_gap}]",
    )
    group.add_argument(
        "--user-mask",
        metavar="FILE",
        help="your own mask: FITS (non-zero = background) or PNG with the background "
        "shaded red (e.g. from GIMP, as in Rauscher 2024 section 3.4)",
    )
    group.add_argument(
        "--user-mask-mode",
        choices=("and", "replace"),
        default="and",
        help="'and' = a pixel is background only if both masks agree; 'replace' = use your "
        "mask alone [and]",
    )


def _mask_options(args: argparse.Namespace) -> MaskOptions:
    return MaskOptions(
        use_footprint=args.footprint != "none",
        footprint_mode="trace" if args.footprint == "none" else args.footprint,
        dilation_radius=args.dilate,
        fixed_slit_band=args.fixed_slit_band,
        fixed_slit_rows=tuple(args.fixed_slit_rows),
        mask_jump=args.mask_jumps,
        jump_fallback=args.jump_fallback,
        mask_failed_open=not args.keep_failed_open,
        clip_sigma=args.clip if args.clip else None,
        guard_min_pixels=args.guard_min_pixels,
        guard_max_gap=args.guard_max_gap,
    )


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "fit", "Options of the noise fit; when not given, the nsclean defaults apply."
    )
    group.add_argument(
        "--method",
        choices=("auto", "readout", "fft", "median"),
        help="'readout' = conditional mean of the noise on each line's (output, tick) "
        "grid with a prior measured on the exposure; 'fft' = NSClean Fourier fit along "
        "each detector line; 'median' = each column's background median; 'auto' "
        "(default) = readout on full frames, fft on subarrays",
    )
    group.add_argument(
        "--max-modes",
        type=int,
        metavar="N",
        help="readout: most common modes per line (default 32; the data choose fewer)",
    )
    group.add_argument(
        "--share-lines",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="readout: prior mean of every line from its neighbours (default on)",
    )
    group.add_argument(
        "--cutoff",
        type=float,
        metavar="CYCLES_PER_PIX",
        help="highest fitted frequency along a line (default 1/256: 9 frequencies)",
    )
    group.add_argument(
        "--rolloff",
        type=float,
        metavar="CYCLES_PER_PIX",
        help="width of the apodizer's cosine roll-off (default 1/1024)",
    )
    group.add_argument(
        "--weight-sigma",
        type=float,
        metavar="PIX",
        help="Gaussian sigma of the background-density weights (default 32)",
    )
    group.add_argument(
        "--outlier-sigma",
        type=float,
        metavar="NSIGMA",
        help="reject background pixels this far from the fit (default 3)",
    )
    group.add_argument(
        "--max-model-variance",
        type=float,
        metavar="FRACTION",
        help="guard: refit lines whose model would add more than this fraction of the pixel "
        "variance (default 0.25)",
    )
    group.add_argument(
        "--smooth-sigma",
        type=float,
        metavar="LINES",
        help="smooth the model across lines (default 0 = off)",
    )
    group.add_argument(
        "--per-channel",
        action="store_true",
        default=None,
        help="median method: one median per 512-row output channel",
    )
    group.add_argument(
        "--mode",
        choices=("auto", "line", "timeseries"),
        help="'line' for full frames, 'timeseries' for subarrays (default auto)",
    )
    group.add_argument(
        "--outlier-iterations",
        type=int,
        metavar="N",
        help="reject-and-refit passes (default 1)",
    )
    group.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="weight each frequency by the correlated power this exposure has there "
        "(default on); --no-adaptive gives the paper's plain apodizer",
    )
    group.add_argument(
        "--chunk-length",
        type=int,
        metavar="TICKS",
        help="time-series mode: chunk length in pixel-clock ticks (default 2048)",
    )


_FIT_FLAGS = (
    "method",
    "cutoff",
    "rolloff",
    "weight_sigma",
    "outlier_sigma",
    "max_model_variance",
    "smooth_sigma",
    "per_channel",
    "mode",
    "outlier_iterations",
    "adaptive",
    "chunk_length",
    "max_modes",
    "share_lines",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``nsclean`` command."""
    parser = argparse.ArgumentParser(
        prog="nsclean",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nsclean {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of unexpected errors"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    mask = commands.add_parser(
        "mask",
        help="build the background mask of one exposure from its cal and rate files",
        description="Build the background mask (1 = background usable for the fit) of one "
        "exposure: the science footprint from the stage-2 cal file (grown by --dilate "
        "pixels), the fixed-slit band (IFU/MOS full frames), pixels flagged DO_NOT_USE, NaN, "
        "the reference border, MSA_FAILED_OPEN, and bright pixels that remain. The cal and "
        "rate files must be the same exposure (same stem, detector and subarray). Writes a "
        "FITS mask whose header records how it was built and, with --png, a quick-look PNG.",
    )
    mask.add_argument("cal", help="stage-2 product of the exposure (_cal.fits)")
    mask.add_argument("rate", help="count-rate product of the exposure (_rate.fits)")
    mask.add_argument(
        "-o", "--output", required=True, metavar="MASK.fits", help="mask file to write"
    )
    mask.add_argument(
        "--png", metavar="MASK.png", help="also write a quick-look PNG (background shaded red)"
    )
    mask.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    mask.add_argument(
        "--json", action="store_true", help="print a JSON summary instead of one line of text"
    )
    _add_mask_options(mask)

    clean = commands.add_parser(
        "clean",
        help="remove the correlated read noise from one rate file",
        description="Fit the correlated read noise on the background pixels of a rate file "
        "and subtract it. The output keeps every extension and header of the input; only SCI "
        "changes, NaNs stay NaN, and the primary header gains S_NSCLEN = 'COMPLETE' and "
        "NSC* keywords and HISTORY recording every option. Give a mask made with "
        "'nsclean mask' (--mask) or the cal file to build one on the fly (--cal), or both.",
    )
    clean.add_argument("rate", help="count-rate product to clean (_rate.fits); never modified")
    clean.add_argument(
        "-o", "--output", required=True, metavar="OUT.fits", help="cleaned rate file to write"
    )
    clean.add_argument(
        "--mask",
        metavar="MASK",
        help="background mask: FITS (non-zero = background) or red-shaded PNG",
    )
    clean.add_argument(
        "--cal",
        metavar="CAL.fits",
        help="cal file of the same exposure, to build the mask automatically",
    )
    clean.add_argument(
        "--save-model",
        action="store_true",
        help="also write the fitted noise model as <stem>_flicker_noise.fits",
    )
    clean.add_argument(
        "--save-mask", action="store_true", help="also write the mask used as <stem>_mask.fits"
    )
    clean.add_argument(
        "--variance",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the model's posterior variance to VAR_RNOISE and recompute ERR "
        "(readout method; default on)",
    )
    clean.add_argument(
        "--product-dir",
        metavar="DIR",
        help="folder for --save-model/--save-mask files [folder of --output]",
    )
    clean.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    clean.add_argument(
        "--json", action="store_true", help="print a JSON summary instead of one line of text"
    )
    _add_fit_options(clean)
    _add_mask_options(
        clean,
        " Used only with --cal; a --mask file is used as it is (its header records how it "
        "was built).",
    )

    png = commands.add_parser(
        "png2mask",
        help="convert a PNG with the background shaded red into a FITS mask",
        description="Convert a hand-made mask (Rauscher 2024, section 3.4): export the rate "
        "image from DS9 to PNG, shade the background red in an image editor, export again, "
        "then run this. Rows are flipped back to FITS order (DS9 shows row 1 at the bottom).",
    )
    png.add_argument("png", help="PNG with the background shaded red")
    png.add_argument(
        "-o", "--output", required=True, metavar="MASK.fits", help="mask file to write"
    )
    png.add_argument(
        "--rate",
        metavar="RATE.fits",
        help="rate file the mask is for: checks the size, copies its identity keywords",
    )
    png.add_argument(
        "--min-red-excess",
        type=float,
        default=20.0,
        metavar="LEVEL",
        help="red must exceed green and blue by this (0-255) to count as background [20]",
    )
    png.add_argument(
        "--no-flip",
        action="store_true",
        help="the PNG is already in FITS row order (row 1 at the top)",
    )
    png.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def _run_mask(args) -> dict:
    from .io.exposure import make_mask

    return make_mask(
        args.cal,
        args.rate,
        args.output,
        user_mask_path=args.user_mask,
        user_mask_mode=args.user_mask_mode,
        png_path=args.png,
        options=_mask_options(args),
        overwrite=args.overwrite,
    )


def _run_clean(args) -> dict:
    from .io.exposure import clean_exposure

    if args.mask is None and args.cal is None:
        raise NSCleanInputError(
            args.rate, "no background mask: give --mask MASK.fits or --cal CAL.fits"
        )
    if args.user_mask is not None:
        raise NSCleanInputError(None, "with 'clean', give your own mask as --mask, not --user-mask")
    fit_options = {
        name: getattr(args, name) for name in _FIT_FLAGS if getattr(args, name) is not None
    }
    return clean_exposure(
        args.rate,
        args.output,
        cal_path=args.cal,
        mask_path=args.mask,
        user_mask_mode=args.user_mask_mode,
        mask_options=_mask_options(args),
        fit_options=fit_options,
        save_model=args.save_model,
        save_mask=args.save_mask,
        product_dir=args.product_dir,
        overwrite=args.overwrite,
        add_variance=args.variance,
    )


def _run_png2mask(args) -> dict:
    from .algorithm.masks import guard_report
    from .io.exposure import read_png_mask, read_rate, write_mask

    mask = read_png_mask(
        args.png, min_red_excess=args.min_red_excess, flip_vertical=not args.no_flip
    )
    header = None
    origin = (0, 0)
    if args.rate:
        rate = read_rate(args.rate)
        if mask.shape != rate.sci.shape:
            raise NSCleanInputError(
                args.png,
                f"PNG is {mask.shape[0]} x {mask.shape[1]} pixels but rate "
                f"{Path(args.rate).name} is {rate.sci.shape[0]} x {rate.sci.shape[1]}",
            )
        header, origin = rate.header, rate.origin
    if not mask.any():
        raise NSCleanInputError(
            args.png, f"no pixel is shaded red (red above green and blue by {args.min_red_excess})"
        )
    info = {
        "source": "user",
        "user_mask": Path(args.png).name,
        "n_background": int(mask.sum()),
        "background_fraction": float(mask.mean()),
        "guard": guard_report(mask, origin=origin),
        "steps": [
            {
                "step": "png",
                "applied": True,
                "flip_vertical": not args.no_flip,
                "min_red_excess": args.min_red_excess,
            }
        ],
    }
    write_mask(args.output, mask, info, reference_header=header, overwrite=args.overwrite)
    return {
        "mask": str(args.output),
        "png": str(args.png),
        "n_background": info["n_background"],
        "background_fraction": round(info["background_fraction"], 6),
        "n_weak_columns": info["guard"]["n_weak_columns"],
    }


def _report(command: str, summary: dict) -> str:
    fraction = 100 * summary.get("background_fraction", 0.0)
    weak = summary.get("n_weak_columns", 0)
    if command == "clean":
        outputs = ", ".join(summary["outputs"])
        fit = summary.get("fit", {})
        return (
            f"wrote {outputs}: background {fraction:.1f} % of pixels, {weak} weak columns, "
            f"{fit.get('n_uncleaned', 0)} lines left uncleaned"
        )
    target = summary["mask"] + (
        f" and {summary['png']}" if summary.get("png") and command == "mask" else ""
    )
    return f"wrote {target}: background {fraction:.1f} % of pixels, {weak} weak columns"


def main(argv: list[str] | None = None) -> int:
    """Run the ``nsclean`` command; return the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 for unusable input or an existing output, 2 for a
        command-line mistake, 3 for an unexpected internal error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    runners = {"mask": _run_mask, "clean": _run_clean, "png2mask": _run_png2mask}
    try:
        summary = runners[args.command](args)
    except (NSCleanInputError, FileExistsError) as exc:
        print(f"nsclean: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except ValueError as exc:
        # Option values that pass argparse but not the algorithm's validation.
        print(f"nsclean: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"nsclean: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:  # the one place where anything may be caught: report, don't crash
        if args.debug:
            raise
        print(
            f"nsclean: error: internal error ({type(exc).__name__}: {exc}); "
            "rerun with --debug for the traceback",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    if getattr(args, "json", False):
        print(json.dumps(summary, sort_keys=True))
    else:
        print(_report(args.command, summary))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
