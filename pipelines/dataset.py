"""Reading an ingested dataset version: its manifest, assets, and splits as Ray Datasets.

Training and evaluation read only what ingest wrote (shards + manifest), never raw media.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from storage import fs, uris
from storage.artefacts import Store
from storage.errors import UserError


class DatasetNotFound(UserError, LookupError):
    pass


@dataclass(frozen=True)
class DatasetVersion:
    id: str
    uri: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, store: Store, dataset_id: str) -> DatasetVersion:
        uri = store.dataset_uri(dataset_id)
        manifest_uri = uris.join(uri, "manifest.json")
        if not fs.exists(manifest_uri):
            raise DatasetNotFound(f"no complete dataset {dataset_id!r} in {store.root}")
        return cls(dataset_id, uri, fs.read_json(manifest_uri))

    @property
    def columns(self) -> dict[str, dict[str, Any]]:
        return self.manifest["columns"]

    def shard_paths(self) -> list[str]:
        _, root = fs.filesystem(self.uri)
        return [f"{root}/{shard['path']}" for shard in self.manifest["shards"]]

    def split_size(self, split: str) -> int:
        return int(self.manifest["splits"].get(split, 0))

    def read(self, split: str | None = None, columns: list[str] | None = None):
        """The rows of ``split`` (all rows if None) as a Ray Dataset."""
        import ray
        from ray.data.expressions import col

        filesystem, _ = fs.filesystem(self.uri)
        wanted = None if columns is None else list(dict.fromkeys([*columns, "split"]))
        dataset = ray.data.read_parquet(self.shard_paths(), filesystem=filesystem, columns=wanted)
        if split is not None:
            dataset = dataset.filter(expr=col("split") == split)
        return dataset if columns is None else dataset.select_columns(columns)

    def to_numpy(self, split: str, columns: list[str]) -> dict[str, np.ndarray]:
        """A (small) split fully in memory, e.g. for evaluation; rows sorted by id."""
        batches = list(
            self.read(split, ["id", *columns]).iter_batches(batch_format="numpy", batch_size=None)
        )
        if not batches:
            raise ValueError(f"split {split!r} of dataset {self.id} is empty")
        merged = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
        order = np.argsort(merged["id"], kind="stable")
        return {key: values[order] for key, values in merged.items()}
