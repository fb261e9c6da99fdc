"""``chorus status``: which artefacts are stale, and why, answered from the store alone.

An artefact is stale when running its stage again, with the configuration given, would not
return it. Its record says why, without any database beside the store:

- an input has a newer version: ``NAME@latest`` of the input's name points at another
  artefact ("dataset ds-a has a newer version ds-b");
- its stage's code changed: the record's ``stage_code`` is not the stage's code version now
  (:func:`pipelines.recipes.stage_code`): "train code changed";
- its config did: the recipe the stage would compute now from the configuration given, on
  the same inputs and with the recorded code, has another key than the record's
  ("evaluate config changed (bootstrap: 10 -> 3)");
- an input is stale: staleness flows downstream ("its run run-... is stale").

Records written before recipes existed (no ``recipe_key`` or ``stage_code``) are judged only
by their inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.config import ChorusConfig
from pipelines.recipes import stage_code
from storage import names
from storage.artefacts import KINDS, Recipe, Store
from storage.errors import UserError
from storage.lineage import LineageRecord

STAGES = {
    "dataset": "ingest",
    "run": "train",
    "evaluation": "evaluate",
    "embedding": "embed",
    "report": "report",
}
SHOWN_CHANGES = 4  # config changes named per artefact; the rest are counted


@dataclass(frozen=True)
class Stale:
    """One stale artefact and every reason found."""

    id: str
    kind: str
    name: str
    uri: str
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"reasons": list(self.reasons)}

    def line(self) -> str:
        return f"{self.kind} {self.id} ({self.name or '-'}): " + "; ".join(self.reasons)


# The recipe the stage that made ``record`` would compute now (None: no config of its own).
RecipeNow = Callable[[Store, LineageRecord, ChorusConfig], Recipe | None]


def _train_recipe(store: Store, record: LineageRecord, cfg: ChorusConfig) -> Recipe:
    from pipelines.dataset import DatasetVersion
    from pipelines.train.launch import run_config_for, train_recipe, training_view

    recorded = record.config
    dataset = training_view(DatasetVersion.open(store, recorded["dataset_id"]), cfg.train)
    options = recorded["objective_options"]
    return train_recipe(run_config_for(dataset, cfg, recorded["objective"], options))


def _evaluation_recipe(store: Store, record: LineageRecord, cfg: ChorusConfig) -> Recipe:
    from pipelines.train.evaluate import evaluation_recipe

    return evaluation_recipe(cfg.evaluate, input_content(record))


def _report_recipe(store: Store, record: LineageRecord, cfg: ChorusConfig) -> Recipe:
    from pipelines.report import report_recipe

    return report_recipe(cfg, input_content(record))


# The embedding's only parameter is the split named on the command line, not config.
RECIPES_NOW: dict[str, RecipeNow] = {
    "run": _train_recipe,
    "evaluation": _evaluation_recipe,
    "report": _report_recipe,
}


def input_content(record: LineageRecord) -> tuple[str, ...]:
    """The content ids of a record's inputs, in the order its stage read them."""
    return tuple(entry.get("content_id") or entry["id"] for entry in record.inputs)


class _Judge:
    """Reasons per artefact, each judged once (an input shared downstream is not re-read)."""

    def __init__(self, store: Store, cfg: ChorusConfig, records: Mapping[str, LineageRecord]):
        self.store, self.cfg, self.records = store, cfg, records
        self._reasons: dict[str, tuple[str, ...]] = {}
        self._latest: dict[str, str | None] = {}

    def reasons(self, artefact_id: str) -> tuple[str, ...]:
        if artefact_id not in self._reasons:
            self._reasons[artefact_id] = ()  # ids are content digests: no cycles, but be safe
            self._reasons[artefact_id] = tuple(self._judge(self.records[artefact_id]))
        return self._reasons[artefact_id]

    def _judge(self, record: LineageRecord) -> Iterable[str]:
        stage = STAGES[record.kind]
        for entry in record.inputs:
            source = self.records.get(entry["id"])
            if source is None:  # a manifest file, or an input removed since
                continue
            newer = self._newest(source.name)
            if newer not in (None, source.id) and self._kind(newer) == source.kind:
                yield f"{source.kind} {source.id} has a newer version {newer}"
        if record.stage_code and record.stage_code != stage_code(stage):
            yield f"{stage} code changed"
        elif record.recipe_key and record.kind in RECIPES_NOW:
            yield from self._config_changes(stage, record)
        for entry in record.inputs:
            if entry["id"] in self.records and self.reasons(entry["id"]):
                yield f"its {entry['kind']} {entry['id']} is stale"

    def _kind(self, artefact_id: str) -> str | None:
        record = self.records.get(artefact_id)
        return record.kind if record else None

    def _newest(self, name: str) -> str | None:
        if not name:
            return None
        if name not in self._latest:
            move = names.current(self.store.root, name, names.LATEST)
            self._latest[name] = move.id if move else None
        return self._latest[name]

    def _config_changes(self, stage: str, record: LineageRecord) -> Iterable[str]:
        try:
            now = RECIPES_NOW[record.kind](self.store, record, self.cfg)
        except UserError as exc:  # the config given cannot even run this stage on its inputs
            yield f"{stage} config changed (it cannot run as given: {exc})"
            return
        if now is None or dataclasses.replace(now, code=record.stage_code).key == record.recipe_key:
            return
        changed = changes(record.config, now.parameters)
        shown = ", ".join(changed[:SHOWN_CHANGES])
        more = f" and {len(changed) - SHOWN_CHANGES} more" if len(changed) > SHOWN_CHANGES else ""
        yield f"{stage} config changed" + (f" ({shown}{more})" if changed else "")


def changes(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for each (dotted) setting of ``now`` that ``recorded`` differs in."""
    before, after = _flat(recorded), _flat(now)
    missing = "(unset)"
    return [
        f"{key}: {before.get(key, missing)} -> {value}"
        for key, value in after.items()
        if before.get(key, missing) != value
    ]


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def stale(store: Store, cfg: ChorusConfig, reference: str | None = None) -> list[Stale]:
    """The stale artefacts of ``store`` (with ``reference``: among it and its upstream),
    upstream kinds first; empty when everything is up to date."""
    records = {r["id"]: LineageRecord.from_json(r) for r in store.list()}
    chosen: Sequence[str] = list(records)
    if reference is not None:
        chosen = upstream(store.resolve(reference).id, records)
    judge = _Judge(store, cfg, records)
    found = [
        Stale(r.id, r.kind, r.name, r.uri, reasons)
        for r in (records[i] for i in chosen)
        if (reasons := judge.reasons(r.id))
    ]
    return sorted(found, key=lambda s: (KINDS.index(s.kind), s.name, s.id))


def upstream(artefact_id: str, records: Mapping[str, LineageRecord]) -> list[str]:
    """``artefact_id`` and every artefact it was made from, by the records' inputs."""
    seen, queue = [artefact_id], [artefact_id]
    while queue:
        for entry in records[queue.pop()].inputs:
            if entry["id"] in records and entry["id"] not in seen:
                seen.append(entry["id"])
                queue.append(entry["id"])
    return seen
