"""Errors that are the user's to fix: the CLI prints them without a traceback."""

from __future__ import annotations

from storage.errors import UserError

# FileNotFoundError: a path named on the command line (a manifest, a config file) is absent.
USER_ERRORS = (UserError, FileNotFoundError)
