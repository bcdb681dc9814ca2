"""`spinekit` command line: a thin shell over the core functions.

Each subcommand lives in the module that owns its science and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches, turns user
mistakes (``InputError``) into one sentence with a non-zero exit, and sets up logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import InputError, MissingDependencyError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("spinekit.info_command", "describe an image (size, spacing, orientation, modality)"),
    "demo": ("spinekit.demo", "build a digital phantom and run the pipeline end to end"),
    "phantom": ("spinekit.phantom.command", "write a digital spine CT phantom with its truth"),
    "segment": ("spinekit.segmentation.command", "segment and label vertebrae in a CT"),
    "bmd": ("spinekit.bmd.command", "volumetric BMD, morphometry and report for a CT"),
    "calibration": ("spinekit.bmd.calibration_command", "create an asynchronous calibration entry from a phantom scan"),
}

EXIT_INPUT_ERROR = 2
EXIT_MISSING_DEPENDENCY = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinekit", description="Opportunistic spine health from routine CT.")
    parser.add_argument("--version", action="version", version=f"spinekit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("spinekit"):
                continue  # command not built yet in this checkout
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_INPUT_ERROR
    try:
        return int(args._run(args) or 0)
    except InputError as exc:
        print(f"spinekit {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except MissingDependencyError as exc:
        print(f"spinekit {args.command}: {exc}", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    except KeyboardInterrupt:
        print(f"spinekit {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
