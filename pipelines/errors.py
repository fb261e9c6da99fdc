"""Errors that are the user's to fix: the CLI prints them without a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from storage.errors import UserError

# FileNotFoundError: a path named on the command line (a manifest, a config file) is absent.
USER_ERRORS = (UserError, FileNotFoundError)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose mistakes follow the CLI's contract: one line ``error: ...``
    on stderr naming the command and the problem, with a pointer to its ``--help``, exit 2
    (argparse prints the usage block above its error). Subparsers made by
    ``add_subparsers`` are of the parent's class, so one class covers every command."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, but an unknown argument is reported by the command it was given to
        (``chorus ingest: unrecognized arguments: ...``), not by the top-level parser."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._chosen(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _chosen(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The (sub)command parser ``parsed`` was parsed by."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest, None))
                if chosen is not None:
                    return chosen._chosen(parsed) if isinstance(chosen, OneLineParser) else chosen
        return self

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())  # argparse's messages may wrap (choices, usage)
        print(f"error: {self.prog}: {text} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)
