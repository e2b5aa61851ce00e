"""`kb config defaults`: the default configuration, generated from the typed settings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kb.settings import Settings


def cmd_config_defaults(args: argparse.Namespace, settings: Settings | None) -> int:
    """Print the default configuration, generated from the typed settings, or write it to --out."""
    from kb.defaults import default_yaml

    text = default_yaml()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the config subcommands to `sub`, each with the shared options of `common`."""
    cf = sub.add_parser("config", help="the configuration")
    cfsub = cf.add_subparsers(dest="config_command", required=True)
    s = cfsub.add_parser("defaults", parents=[common],
                         help="print the default configuration (every key, its default and documentation), "
                              "generated from the typed settings in kb/settings.py")
    s.add_argument("--out", help="write it to this file (e.g. configs/default.yaml) instead of stdout")
    s.set_defaults(func=cmd_config_defaults, needs_settings=False)
