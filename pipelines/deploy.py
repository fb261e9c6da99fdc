"""Scheduled deployments: what ``chorus deploy`` registers with a Prefect server and serves.

A deployment is a flow (``end_to_end``, ``ingest`` or ``train``), its input manifest, a
schedule (cron or interval) and the validated configuration its runs get. One comes from the
command line; several from a YAML file (``chorus deploy --file deployments.yaml``)::

    deployments:
      - name: nightly            # served as chorus-ingest/nightly
        flow: ingest
        manifest: "s3://bucket/drops/*.csv"   # a glob: every drop's manifest
        incremental: true        # decode only the new drops
        cron: "0 2 * * *"
        config: chorus.yaml      # optional: a config file, then `set` overrides
        set: [ingest.batch_size=128]
      - name: weekly
        flow: end_to_end
        manifest: s3://bucket/drops/manifest.csv
        interval: 604800

Everything is validated before anything is registered: a bad entry fails naming it.
Serving itself (Prefect) lives in ``pipelines.flows.serve``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.config import ChorusConfig, ConfigError, load, to_dict
from storage import uris
from storage.errors import UserError

FLOW_NAMES = {"end_to_end": "chorus-end-to-end", "ingest": "chorus-ingest", "train": "chorus-train"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class DeploymentError(UserError):
    """A deployment cannot be registered as given."""


class DeploymentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Deployment name: lowercase letters, digits, '-' and '_'.")
    flow: Literal["end_to_end", "ingest", "train"] = Field(
        "end_to_end", description="The flow its runs execute."
    )
    manifest: str = Field(description="Input manifest (path or s3:// URI).")
    cron: str | None = Field(None, description="Cron schedule, e.g. '0 2 * * *'.")
    interval: float | None = Field(None, gt=0, description="Seconds between runs.")
    incremental: bool = Field(
        False, description="Decode only what is new or changed since the last version."
    )
    config: ChorusConfig

    @model_validator(mode="after")
    def _one_schedule(self) -> DeploymentSpec:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use lowercase letters, digits, '-' and '_'")
        if (self.cron is None) == (self.interval is None):
            raise ValueError(f"{self.name}: give exactly one of cron or interval")
        return self

    @property
    def qualified_name(self) -> str:
        """What ``prefect deployment run`` takes: ``<flow name>/<deployment name>``."""
        return f"{FLOW_NAMES[self.flow]}/{self.name}"

    def parameters(self) -> dict:
        """The flow run's parameters as JSON (the server stores them)."""
        source = {"train": "source"}.get(self.flow, "manifest_uri")
        parameters = {source: self.manifest, "config": to_dict(self.config)}
        return parameters | {"incremental": self.incremental}


def spec(name: str, manifest: str, config: ChorusConfig, **fields) -> DeploymentSpec:
    """One validated deployment (``fields``: flow, cron, interval, incremental); the
    manifest is made absolute, since runs start in another process."""
    manifest = uris.normalise(manifest)
    try:
        return DeploymentSpec.model_validate(
            {"name": name, "manifest": manifest, "config": config, **fields}
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or name
        raise DeploymentError(f"deployment {name!r}: {field}: {error['msg']}") from None


def from_file(path: str | Path, overrides: list[str] | None = None) -> list[DeploymentSpec]:
    """The deployments of a YAML file; each entry's config file is relative to the file."""
    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DeploymentError(f"cannot read deployments file {path}: {exc}") from None
    entries = document.get("deployments") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DeploymentError(f"{path}: expected a non-empty 'deployments:' list")
    specs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "manifest" not in entry:
            raise DeploymentError(f"{path}: deployments[{index}] needs a name and a manifest")
        entry = dict(entry)
        config_file = entry.pop("config", None)
        if config_file is not None:
            config_file = Path(path).parent / config_file
        try:
            config = load("base", config_file, [*entry.pop("set", []), *(overrides or [])])
        except ConfigError as exc:
            raise DeploymentError(f"deployment {entry['name']!r}: {exc}") from None
        manifest = entry.pop("manifest")
        if not uris.is_remote(manifest):
            manifest = str(Path(path).parent / manifest)
        specs.append(spec(entry.pop("name"), manifest, config, **entry))
    names = [s.qualified_name for s in specs]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise DeploymentError(f"{path}: duplicate deployment(s) {duplicates}")
    return specs


def require_server() -> str:
    """The Prefect server deployments register with; the ephemeral API runs no scheduler."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise DeploymentError(
            "chorus deploy needs a Prefect server: start one (`make stack`) and export "
            "PREFECT_API_URL (source .chorus/stack/env)"
        )
    return url
