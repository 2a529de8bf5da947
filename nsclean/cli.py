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
from .algorithm.options import CLEAN_OPTIONS, MASK_OPTIONS, Option
from .io.errors import NSCleanInputError

EXIT_OK = 0
EXIT_INPUT = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3

_DESCRIPTION = """\
Remove correlated read noise (1/f vertical banding, "picture frame") from JWST
NIRSpec count-rate images (_rate.fits) with the NSClean algorithm (Rauscher 2024).
The noise is fitted on background pixels only; a background mask says which
pixels are dark. Typical use, one exposure:

  nsclean mask  jw..._nrs1_cal.fits jw..._nrs1_rate.fits -o jw..._nrs1_mask.fits
  nsclean clean jw..._nrs1_rate.fits --mask jw..._nrs1_mask.fits -o cleaned/jw..._nrs1_rate.fits

A time series (BOTS _rateints, one plane per integration, possibly in segments) is
cleaned integration by integration with one mask from its _calints footprint:

  nsclean clean jw..._00001-seg00?_nrs1_rateints.fits \\
      --cal jw..._00001-seg001_nrs1_calints.fits -o cleaned/
"""


def _default_text(option: Option) -> str:
    if option.length is not None:
        return " ".join(map(str, option.default))
    if option.type is bool:
        return "yes" if option.default else "no"
    if option.name in ("cutoff", "rolloff"):
        return f"1/{round(1 / option.default)}"
    return f"{option.default:g}" if isinstance(option.default, float) else str(option.default)


def _add_option(group, option: Option, *, default=None, extra_help: str = "") -> None:
    """One command-line option from its registry entry (nsclean.algorithm.options)."""
    help_text = option.help + extra_help
    if option.invert:
        help_text = f"turn off: {help_text}"
    else:
        help_text += f" [{_default_text(option)}]"
    kwargs = {"dest": option.name, "default": default,
              "help": help_text.replace("%", "%%")}
    if option.type is bool:
        kwargs["action"] = "store_false" if option.invert else argparse.BooleanOptionalAction
    else:
        kwargs.update(type=option.type, metavar=option.metavar)
        if option.choices:
            kwargs["choices"] = option.choices
        if option.length is not None:
            kwargs["nargs"] = option.length
    group.add_argument(option.cli_flag, **kwargs)


def _add_mask_options(parser: argparse.ArgumentParser, note: str = "") -> None:
    group = parser.add_argument_group(
        "automatic mask",
        "How the background mask is built from the cal and rate files. Defaults are in "
        "brackets." + note,
    )
    for option in MASK_OPTIONS:
        if option.cli_flag is None:
            continue
        default = list(option.default) if option.length else option.default
        if option.name == "footprint_mode":
            # One flag for two options: "none" turns use_footprint off.
            group.add_argument(
                option.cli_flag, dest=option.name, default=option.default,
                choices=(*option.choices, "none"),
                help=f"{option.help} none: do not use the cal footprint "
                f"[{option.default}]")
            continue
        _add_option(group, option, default=default)
    group.add_argument(
        "--user-mask",
        metavar="FILE",
        help="your own mask: FITS (1 = background, 0 = not) or PNG with the background "
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
    options = {o.name: getattr(args, o.name) for o in MASK_OPTIONS if o.cli_flag is not None}
    options["use_footprint"] = options["footprint_mode"] != "none"
    if options["footprint_mode"] == "none":
        options["footprint_mode"] = MaskOptions().footprint_mode
    options["fixed_slit_rows"] = tuple(options["fixed_slit_rows"])
    options["clip_sigma"] = options["clip_sigma"] or None  # 0 = off
    return MaskOptions(**options)


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "fit", "Options of the noise fit; when not given, the nsclean defaults (in "
        "brackets) apply."
    )
    for option in CLEAN_OPTIONS:
        if option.cli_flag is not None:
            _add_option(group, option)


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

    _add_mask_command(commands)
    _add_clean_command(commands)
    _add_png2mask_command(commands)
    return parser


def _add_mask_command(commands) -> None:
    """Add the ``mask`` subcommand to the subparsers ``commands``."""
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
    mask.add_argument("cal", help="stage-2 product of the exposure (_cal.fits, or a "
                      "_calints.fits of a time series)")
    mask.add_argument("rate", nargs="+", help="count-rate product of the exposure "
                      "(_rate.fits; or every _rateints.fits segment of a time series)")
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


def _add_clean_command(commands) -> None:
    """Add the ``clean`` subcommand to the subparsers ``commands``."""
    clean = commands.add_parser(
        "clean",
        help="remove the correlated read noise from one rate file",
        description="Fit the correlated read noise on the background pixels of a rate file "
        "and subtract it. The output keeps every extension and header of the input; only SCI "
        "changes, NaNs stay NaN, and the primary header gains S_NSCLEN = 'COMPLETE' and "
        "NSC* keywords and HISTORY recording every option. Give a mask made with "
        "'nsclean mask' (--mask) or the cal file to build one on the fly (--cal), or both.",
    )
    clean.add_argument("rate", nargs="+", help="count-rate product to clean (_rate.fits), or "
                       "every _rateints.fits segment of one time series; never modified")
    clean.add_argument(
        "-o", "--output", required=True, metavar="OUT.fits",
        help="cleaned rate file to write; for rateints a folder, which gets one "
        "<file stem>_nsclean_rateints.fits per input file",
    )
    clean.add_argument(
        "--mask",
        metavar="MASK",
        help="background mask: FITS (1 = background, 0 = not) or red-shaded PNG",
    )
    clean.add_argument(
        "--cal",
        metavar="CAL.fits",
        action="append",
        help="cal file of the same exposure, to build the mask automatically (for rateints: "
        "its calints; repeat --cal for several segments)",
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


def _add_png2mask_command(commands) -> None:
    """Add the ``png2mask`` subcommand to the subparsers ``commands``."""
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


def _ints_given(paths) -> bool:
    from .io.tso import is_ints_product

    return any(is_ints_product(p) for p in paths if Path(p).is_file())


def _one_rate(paths) -> str:
    if len(paths) > 1:
        raise NSCleanInputError(
            paths[1], "several rate files given: only the segments of one _rateints time "
            "series can be given together"
        )
    return paths[0]


def _run_mask(args) -> dict:
    from .io.exposure import make_mask

    if _ints_given(args.rate):
        from .io.tso import make_rateints_mask

        return make_rateints_mask(
            args.cal, args.rate, args.output, user_mask_path=args.user_mask,
            user_mask_mode=args.user_mask_mode, options=_mask_options(args),
            overwrite=args.overwrite,
        ) | {"png": None}
    return make_mask(
        args.cal,
        _one_rate(args.rate),
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
            args.rate[0], "no background mask: give --mask MASK.fits or --cal CAL.fits"
        )
    if args.user_mask is not None:
        raise NSCleanInputError(None, "with 'clean', give your own mask as --mask, not --user-mask")
    fit_options = {
        option.name: getattr(args, option.name)
        for option in CLEAN_OPTIONS
        if option.cli_flag is not None and getattr(args, option.name) is not None
    }
    if _ints_given(args.rate):
        from .io.tso import clean_rateints

        return clean_rateints(
            args.rate, args.output, calints_paths=args.cal, mask_path=args.mask,
            user_mask_mode=args.user_mask_mode, mask_options=_mask_options(args),
            fit_options=fit_options, save_model=args.save_model, save_mask=args.save_mask,
            product_dir=args.product_dir, overwrite=args.overwrite,
        )
    if args.cal is not None and len(args.cal) > 1:
        raise NSCleanInputError(args.cal[1], "one --cal file per rate file")
    return clean_exposure(
        _one_rate(args.rate),
        args.output,
        cal_path=args.cal[0] if args.cal else None,
        mask_path=args.mask,
        user_mask_mode=args.user_mask_mode,
        # A --mask file alone is used as it is, with the options its header records.
        mask_options=_mask_options(args) if args.cal is not None else None,
        fit_options=fit_options,
        save_model=args.save_model,
        save_mask=args.save_mask,
        product_dir=args.product_dir,
        overwrite=args.overwrite,
    )


def _run_png2mask(args) -> dict:
    from .algorithm.masks import guard_report
    from .io.exposure import _refuse_inputs_as_outputs as refuse_inputs_as_outputs
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
    refuse_inputs_as_outputs([args.png, args.rate], [args.output])
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
