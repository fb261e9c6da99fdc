"""The root of every error that is the user's to fix.

The CLI prints a :class:`UserError` as one line and exits 2; anything else is a bug and
keeps its traceback. Each layer subclasses it for its own mistakes (a bad config field, a
malformed manifest, an unknown artefact, a missing bucket, ...).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what to change, in one line."""


class StoreNotFound(UserError):
    """A reading command was pointed at an artefact store that does not exist."""


class BucketNotFound(UserError):
    """The S3 bucket of a URI does not exist."""


class StorageUnreachable(UserError):
    """The S3 endpoint cannot be reached or refuses the request (address, credentials)."""
