"""Command line: ``python -m scconv summary [NAMES...] [--size 224]``."""

import argparse

from scconv.models import InputTooSmallError, list_models


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scconv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="parameters and GMACs per model")
    summary.add_argument(
        "names", nargs="*", metavar="NAME", help=f"models ({', '.join(list_models())})"
    )
    summary.add_argument(
        "--size", type=int, default=224, help="input height and width (default 224)"
    )
    args = parser.parse_args(argv)

    unknown = [n for n in args.names if n not in list_models()]
    if unknown:
        summary.error(
            f"unknown model(s) {', '.join(unknown)}; available: {', '.join(list_models())}"
        )
    if args.size < 1:
        summary.error(f"--size must be positive, got {args.size}")
    from scconv.summary import summary as summarize

    try:
        table = summarize(args.names, args.size)
    except InputTooSmallError as error:  # names the smallest size that works
        summary.error(str(error))
    print(
        table.to_string(
            index=False, formatters={"params_M": "{:.2f}".format, "GMACs": "{:.2f}".format}
        )
    )


if __name__ == "__main__":
    main()
