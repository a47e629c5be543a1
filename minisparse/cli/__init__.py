"""The ``minisparse`` command line (the console script calls :func:`main`).

Modules: :mod:`.common` (errors, argument types, output checks, model loading, shared by
all), :mod:`.main` (``demo``, ``train``, ``generate``, the parser, the entry point),
:mod:`.profile`, :mod:`.relufy`, :mod:`.bench`. Each subcommand module has a
``register(subparsers)``; :func:`build_parser` calls them.
"""
from .common import UserError, check_out_dir, load_any
from .main import build_parser, main

__all__ = ["UserError", "build_parser", "check_out_dir", "load_any", "main"]
