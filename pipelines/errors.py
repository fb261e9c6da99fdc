"""Errors that are the user's to fix: the CLI prints them without a traceback."""

from __future__ import annotations

from pipelines.config import ConfigError
from pipelines.dataset import DatasetNotFound
from pipelines.ingest import ManifestError
from storage.artefacts import ArtefactNotFound

USER_ERRORS = (ConfigError, ManifestError, DatasetNotFound, ArtefactNotFound, FileNotFoundError)
