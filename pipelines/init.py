"""``chorus init``: a starting config for a manifest, from its columns and a few of its files.

Each column's kind comes from the content of up to :data:`SNIFF` referenced files (magic
bytes: PIL for images, libsndfile for audio, NPY/Parquet/CSV tables of numbers for series,
anything else UTF-8 for text) or, for cells that reference no file, inline text. The sniffed
sizes, sample rates, channels and lengths become the column's settings; ``split`` and
``label`` are reported, not configured. The result is a commented YAML the user edits. Only
light libraries are imported (no torch, Ray or Prefect), so the command answers at once.
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from modalities import timeseries
from modalities.base import DecodeError
from pipelines.config import DataConfig
from pipelines.identity import is_reference
from pipelines.ingest import read_manifest
from storage import fs, uris
from storage.errors import UserError

SNIFF = 5  # referenced files read per column
MAX_IMAGE_SIZE = 224  # a starting size: larger images train slowly on CPUs
MAX_SERIES_LENGTH = 5000
MAX_TEXT_TOKENS = 128
# A cell that names a file (no spaces, an extension) rather than holding text.
_LOOKS_LIKE_PATH = re.compile(r"^\S+\.[A-Za-z0-9]{1,5}$")
# Tokens as the word-level tokenizer's Whitespace pre-tokenizer splits them.
_TOKEN = re.compile(r"\w+|[^\w\s]+")


class InitError(UserError):
    """The manifest cannot give a starting config, or the output exists."""


@dataclass(frozen=True)
class ImageFile:
    format: str
    width: int
    height: int
    mode: str


@dataclass(frozen=True)
class AudioFile:
    format: str
    sample_rate: int
    channels: int
    duration_s: float


@dataclass(frozen=True)
class SeriesFile:
    format: str  # npy, parquet or csv, as modalities.timeseries reads it
    shape: tuple[int, ...]  # the table as stored
    header: bool  # a CSV whose first row names the channels


@dataclass(frozen=True)
class TextFile:
    tokens: int


Sniffed = ImageFile | AudioFile | SeriesFile | TextFile


@dataclass(frozen=True)
class Column:
    """A modality column: its config (``kind`` first) and what the sniffing saw."""

    name: str
    settings: dict[str, Any]
    seen: str


@dataclass(frozen=True)
class Findings:
    manifest: str
    rows: int
    columns: list[Column]
    splits: dict[str, int]
    label_classes: int | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # column -> why it is not used

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "rows": self.rows,
            "columns": {c.name: {**c.settings, "seen": c.seen} for c in self.columns},
            "splits": self.splits,
            "label_classes": self.label_classes,
            "skipped": self.skipped,
        }


def sniff(data: bytes) -> Sniffed | None:
    """What a file holds, judged by its content; None when no modality reads it."""
    return _image(data) or _audio(data) or _series(data) or _text(data)


def _image(data: bytes) -> ImageFile | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return ImageFile(image.format or "?", image.width, image.height, image.mode)
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _audio(data: bytes) -> AudioFile | None:
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        return None
    return AudioFile(info.format, info.samplerate, info.channels, info.duration)


def _series(data: bytes) -> SeriesFile | None:
    try:
        fmt, table = timeseries._load(data)
    except (ValueError, UnicodeDecodeError, OSError, DecodeError):
        return None
    if table.ndim != 2 or max(table.shape) < 2:
        return None
    first_line = data.decode("utf-8-sig").lstrip().split("\n")[0] if fmt == "csv" else ""
    return SeriesFile(
        fmt, tuple(table.shape), bool(first_line) and timeseries._is_header(first_line)
    )


def _text(data: bytes) -> TextFile | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return TextFile(_tokens(text)) if text.strip() else None


def _tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def _read(root: str, cell: str) -> bytes | str:
    """The bytes a cell references, or why they cannot be read."""
    try:
        return fs.read_bytes(uris.resolve_under(root, cell))
    except ValueError as exc:  # outside the manifest's folder
        return f"{exc}; list its folder in data.allowed_roots"
    except OSError as exc:
        return f"{cell}: {exc}"


def _column(name: str, cells: list[str], root: str) -> Column | str:
    """The column's config from its cells, or why it is not a modality column."""
    read = {cell: _read(root, cell) for cell in cells[:SNIFF]}
    files = {cell: data for cell, data in read.items() if isinstance(data, bytes)}
    if not files:
        if all(_LOOKS_LIKE_PATH.match(cell) for cell in read):
            return f"no referenced file could be read ({next(iter(read.values()))})"
        return _inline_text(name, cells)
    sniffed = [s for s in map(sniff, files.values()) if s is not None]
    if not sniffed:
        return f"{len(files)} file(s) of no known format (e.g. {next(iter(files))})"
    kind, count = Counter(type(s) for s in sniffed).most_common(1)[0]
    if kind is TextFile and not all(is_reference("text", cell) for cell in files):
        return (
            "text files whose names do not end in .txt: ingest would take each cell for the "
            "text itself (rename them, or use s3:// or file:// URIs)"
        )
    column = SETTINGS[kind](name, [s for s in sniffed if isinstance(s, kind)])
    if count < len(files):
        return Column(name, column.settings, f"{column.seen}; {len(files) - count} other(s)")
    return column


def _inline_text(name: str, cells: list[str]) -> Column:
    tokens = [_tokens(cell) for cell in cells]
    return Column(name, _text_settings(tokens), f"inline text, {_spread(tokens)} tokens")


def _image_column(name: str, files: list[ImageFile]) -> Column:
    side = min(min(f.width, f.height) for f in files)
    size = max(8, min(side, MAX_IMAGE_SIZE))
    shapes = ", ".join(sorted({f"{f.width}x{f.height} {f.mode} {f.format}" for f in files}))
    capped = f" (size capped at {MAX_IMAGE_SIZE})" if side > MAX_IMAGE_SIZE else ""
    return Column(name, {"kind": "image", "size": size}, f"{len(files)} image(s): {shapes}{capped}")


def _audio_column(name: str, files: list[AudioFile]) -> Column:
    rate = Counter(f.sample_rate for f in files).most_common(1)[0][0]
    duration = round(statistics.median(f.duration_s for f in files), 2)
    rates = "/".join(str(r) for r in sorted({f.sample_rate for f in files}))
    channels = "/".join(str(c) for c in sorted({f.channels for f in files}))
    seen = (
        f"{len(files)} {'/'.join(sorted({f.format for f in files}))} file(s): {rates} Hz, "
        f"{channels} channel(s), {_spread([f.duration_s for f in files])} s"
    )
    settings = {"kind": "audio", "sample_rate": rate, "duration_s": duration}
    return Column(name, settings, seen)


def _series_column(name: str, files: list[SeriesFile]) -> Column:
    # Series are longer than they are wide: the shorter axis holds the channels.
    samples_by_channels = Counter(f.shape[0] >= f.shape[1] for f in files).most_common(1)[0][0]
    layout = "samples_by_channels" if samples_by_channels else "channels_by_samples"
    channels = Counter(min(f.shape) for f in files).most_common(1)[0][0]
    length = int(statistics.median(max(f.shape) for f in files))
    settings = {
        "kind": "timeseries",
        "channels": channels,
        "length": min(length, MAX_SERIES_LENGTH),
    }
    if any(timeseries.DEFAULT_LAYOUT[f.format] != layout for f in files):
        settings["layout"] = layout
    formats = "/".join(sorted({f.format.upper() for f in files}))
    header = " with a header row" if any(f.header for f in files) else ""
    seen = f"{len(files)} {formats} file(s){header}: {length} samples x {channels} channel(s)"
    if length > MAX_SERIES_LENGTH:
        seen += f" (resampled to {MAX_SERIES_LENGTH})"
    return Column(name, settings, seen)


def _text_file_column(name: str, files: list[TextFile]) -> Column:
    tokens = [f.tokens for f in files]
    return Column(
        name, _text_settings(tokens), f"{len(files)} .txt file(s), {_spread(tokens)} tokens"
    )


def _text_settings(tokens: list[int]) -> dict[str, Any]:
    """``max_length`` covers 95% of the texts (in word-level tokens)."""
    p95 = statistics.quantiles(tokens, n=20, method="inclusive")[-1] if tokens[1:] else tokens[0]
    return {"kind": "text", "max_length": max(4, min(math.ceil(p95), MAX_TEXT_TOKENS))}


SETTINGS = {
    ImageFile: _image_column,
    AudioFile: _audio_column,
    SeriesFile: _series_column,
    TextFile: _text_file_column,
}


def _spread(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def inspect(manifest_uri: str) -> Findings:
    """Read the manifest and a few files per column; raises InitError when fewer than two
    columns hold a modality."""
    manifest_uri = uris.normalise(manifest_uri)
    table, _ = read_manifest(manifest_uri, {})
    root = uris.parent(manifest_uri)
    columns, skipped = [], {}
    for name in table.column_names:
        if name in ("id", "split", "label"):
            continue
        found = _candidate(name, table.column(name), root)
        if isinstance(found, Column):
            columns.append(found)
        else:
            skipped[name] = found
    if len(columns) < 2:
        reasons = "; ".join(f"{n}: {why}" for n, why in skipped.items()) or "none"
        raise InitError(
            f"manifest {manifest_uri} has {len(columns)} modality column(s) (a contrastive "
            f"dataset needs two); columns not used: {reasons}"
        )
    DataConfig.model_validate({"columns": {c.name: c.settings for c in columns}})
    labels = table.column("label").drop_null() if "label" in table.column_names else None
    return Findings(
        manifest=manifest_uri,
        rows=len(table),
        columns=columns,
        splits=dict(Counter(table.column("split").to_pylist())),
        label_classes=len(set(labels.to_pylist())) if labels is not None else None,
        skipped=skipped,
    )


def _candidate(name: str, values: pa.ChunkedArray, root: str) -> Column | str:
    if name == "subject_id":
        return "subject ids (reserved)"
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        return f"{values.type} values, not references or text"
    cells = [c for c in values.to_pylist() if c not in (None, "")]
    if not cells:
        return "empty"
    return _column(name, cells, root)


def render(findings: Findings, manifest_arg: str) -> str:
    """The commented YAML of a starting config."""
    entries = [f"    {_key(c.name)}: {_flow(c.settings)}" for c in findings.columns]
    width = max(map(len, entries)) + 2
    lines = [
        f"# Written by `chorus init {manifest_arg}` from {findings.rows} rows and up to "
        f"{SNIFF} files per column.",
        "# Edit freely; `chorus config` prints every field, `chorus ingest MANIFEST` uses this",
        "# file (./chorus.yaml is read when --config is not given).",
        f"# splits: {_splits(findings.splits)}",
    ]
    if findings.label_classes is not None:
        lines.append(f"# label: {findings.label_classes} classes (class accuracy, zero-shot)")
    lines += [f"# not used: {name}: {why}" for name, why in findings.skipped.items()]
    lines += ["data:", "  columns:"]
    lines += [f"{e:<{width}}# {c.seen}" for e, c in zip(entries, findings.columns, strict=True)]
    first = findings.columns[0].name
    lines += [
        f"# evaluate: {{target: {_key(first)}}}  # the retrieved modality; default: the first"
        " column",
    ]
    return "\n".join(lines) + "\n"


def _splits(splits: dict[str, int]) -> str:
    listed = ", ".join(f"{name} ({n})" for name, n in sorted(splits.items()))
    if "val" not in splits:
        listed += "; no 'val': training holds out train.val_fraction of train"
    return listed


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else json.dumps(name)


def _flow(settings: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + "}"


def write(manifest_uri: str, output: str | Path, *, force: bool = False) -> Findings:
    """Inspect the manifest and write the starting config to ``output``."""
    output = Path(output)
    if output.exists() and not force:
        raise InitError(f"{output} exists; pass --force to overwrite it")
    findings = inspect(manifest_uri)
    output.write_text(render(findings, manifest_uri))
    return findings
