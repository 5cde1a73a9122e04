"""``nostall config``: print a built-in loader configuration, list them, or check a file.

It reads only :mod:`nostall.core._loader_config` (no torch import), so it answers at once.
"""

from __future__ import annotations

import argparse
import sys

from ..core._loader_config import TEMPLATE_USES, TEMPLATES, ConfigError, LoaderConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``config`` subcommand to a ``nostall`` argument parser."""
    p = subparsers.add_parser(
        "config",
        description=(
            "Print one of the built-in loader configurations as YAML (redirect it to a "
            "file and load it with nostall.DataLoader.from_config(dataset, PATH)), list "
            "them, or check a configuration file."
        ),
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--template", choices=list(TEMPLATES), metavar="NAME",
                      help=f"print a template as YAML ({', '.join(TEMPLATES)})")
    what.add_argument("--list", action="store_true", dest="list_templates",
                      help="list the templates and what each is for")
    what.add_argument("--check", metavar="PATH",
                      help="validate a configuration file; print it with defaults filled in")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Carry out ``nostall config``; 0 on success, 1 on an invalid or unreadable file."""
    if args.list_templates:
        width = max(map(len, TEMPLATES))
        for name in TEMPLATES:
            print(f"{name:<{width}}  {TEMPLATE_USES[name]}")
        return 0
    if args.template:
        print(TEMPLATES[args.template].to_yaml(
            comment=f"template {args.template!r}: {TEMPLATE_USES[args.template]}"), end="")
        return 0
    try:
        config = LoaderConfig.load(args.check)
    except ConfigError as exc:
        print(f"nostall config: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"nostall config: cannot read {args.check}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(config.to_yaml(comment=f"{args.check}: valid (every setting shown, defaults filled in)"),
          end="")
    return 0
