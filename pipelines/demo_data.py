"""Synthetic Symile-M3-like demo data: real PNG / WAV / NPY files plus a manifest.

Each record has a language l (one of the first ``languages`` of english, french, german,
spanish, italian) and, independently for every language l', a class c_l' in 0..classes-1.

- text: the number word for c_l' in language l' for every l', shuffled ("deux nine drei").
- audio: 0.5 s at 16 kHz whose pitch band identifies l (and nothing about any class).
- series: a (3, 200) float32 IMU-like trace whose oscillation identifies l, more noisily.
- image: a 32x32 seven-segment glyph of c_l, the record's label.

So the label is determined by text and (audio or series) jointly and by neither alone: the
text lists one candidate class per language, and only the language picks which one. Every
record is drawn from its own generator seeded by (seed, index), so output is byte-identical
for a seed and independent of generation order. The manifest is written last.

Missing modalities (:func:`with_missing`, ``chorus demo --missing RATE``): a second manifest
over the same files in which, for each listed column independently, exactly ``round(RATE *
n_train)`` training rows have an empty cell; val and test rows stay complete, so models
trained with and without missing data are evaluated on the same fully observed rows.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import io
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from pipelines import console

LANGUAGES = ("english", "french", "german", "spanish", "italian")
# Real spellings. The only words shared between languages are cognates naming the same
# number (six en/fr, zero en/it, uno es/it), so (text, language) always fixes the label.
NUMBER_WORDS = {
    "english": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "french": ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"),
    "german": ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"),
    "spanish": ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"),
    "italian": ("zero", "uno", "due", "tre", "quattro", "cinque", "sei", "sette", "otto", "nove"),
}
COLUMNS = ("id", "image", "audio", "text", "timeseries", "split", "label", "language")
SPLITS = (("train", 0.8), ("val", 0.9), ("test", 1.0))  # cumulative fractions

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # draw at 4x and box-filter down, so sub-pixel jitter gives anti-aliased strokes

SAMPLE_RATE = 16_000
AUDIO_SAMPLES = 8_000  # 0.5 s
# Language k sounds two partials at (1, 1.5) x AUDIO_BASE_HZ[k]; octave spacing keeps every
# band >= 1.25x away from its neighbours' even with the +-3 % pitch jitter.
AUDIO_BASE_HZ = (250.0, 500.0, 1000.0, 2000.0, 4000.0)
AUDIO_PARTIALS = ((1.0, 1.0), (1.5, 0.6))  # (frequency ratio, relative amplitude)

SERIES_CHANNELS, SERIES_SAMPLES = 3, 200
SERIES_NOISE = 0.5  # vs. unit-scale oscillation: the series is the noisier language cue
SERIES_CYCLES = (4.0, 7.0, 11.0, 16.0, 22.0)  # oscillation cycles per window, per language
# Per-language channel amplitudes, so the pattern across channels is characteristic too.
SERIES_CHANNEL_GAIN = (
    (1.0, 0.5, 0.2),
    (0.2, 1.0, 0.5),
    (0.5, 0.2, 1.0),
    (1.0, 1.0, 0.2),
    (0.2, 1.0, 1.0),
)

# Seven-segment layout: segment -> (x0, y0, x1, y1) in a unit glyph 1 wide and 2 tall.
SEGMENTS = {
    "a": (0, 0, 1, 0),
    "b": (1, 0, 1, 1),
    "c": (1, 1, 1, 2),
    "d": (0, 2, 1, 2),
    "e": (0, 1, 0, 2),
    "f": (0, 0, 0, 1),
    "g": (0, 1, 1, 1),
}
DIGIT_SEGMENTS = (
    "abcdef",
    "bc",
    "abdeg",
    "abcdg",
    "bcfg",
    "acdfg",
    "acdefg",
    "abc",
    "abcdefg",
    "abcdfg",
)


def render_digit(digit: int, rng: np.random.Generator) -> Image.Image:
    """A 32x32 RGB seven-segment ``digit``: bright random stroke on a dark random background."""
    s = SUPERSAMPLE
    hue, sat, val = rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.8, 1.0)
    stroke = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, sat, val))
    background = tuple(int(v) for v in rng.integers(0, 60, size=3))
    width = rng.uniform(2.0, 3.0) * s
    half_w = 5.5 * rng.uniform(0.85, 1.15) * s  # glyph is ~11 x 22 px before jitter
    cx, cy = (IMAGE_SIZE / 2 + rng.uniform(-3, 3, size=2)) * s
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), background)
    draw = ImageDraw.Draw(big)
    for name in DIGIT_SEGMENTS[digit]:
        x0, y0, x1, y1 = SEGMENTS[name]
        p0 = (cx + (2 * x0 - 1) * half_w, cy + (y0 - 1) * 2 * half_w)
        p1 = (cx + (2 * x1 - 1) * half_w, cy + (y1 - 1) * 2 * half_w)
        draw.polygon(_segment_polygon(p0, p1, width), fill=stroke)
    pixels = np.asarray(big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), np.float32)
    pixels += rng.normal(0.0, 6.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def _segment_polygon(p0, p1, width: float) -> list[tuple[float, float]]:
    """A hexagonal bar from p0 to p1 with pointed ends, like an LCD segment."""
    (x0, y0), (x1, y1), h = p0, p1, width / 2
    if y0 == y1:  # horizontal
        return [
            (x0, y0),
            (x0 + h, y0 - h),
            (x1 - h, y0 - h),
            (x1, y0),
            (x1 - h, y0 + h),
            (x0 + h, y0 + h),
        ]
    return [
        (x0, y0),
        (x0 + h, y0 + h),
        (x0 + h, y1 - h),
        (x0, y1),
        (x0 - h, y1 - h),
        (x0 - h, y0 + h),
    ]


def synthesise_audio(language: int, rng: np.random.Generator) -> np.ndarray:
    """0.5 s mono float32 in [-1, 1]: a few 'syllables' in the language's pitch band."""
    t = np.arange(AUDIO_SAMPLES) / SAMPLE_RATE
    base = AUDIO_BASE_HZ[language] * rng.uniform(0.97, 1.03)
    tone = sum(
        amp * np.sin(2 * np.pi * ratio * base * t + rng.uniform(0, 2 * np.pi))
        for ratio, amp in AUDIO_PARTIALS
    ) / sum(amp for _, amp in AUDIO_PARTIALS)
    envelope = np.zeros(AUDIO_SAMPLES)
    onset = int(rng.uniform(0.0, 0.1) * SAMPLE_RATE)
    for _ in range(rng.integers(2, 6)):
        length = int(rng.uniform(0.06, 0.16) * SAMPLE_RATE)
        start = rng.integers(onset, AUDIO_SAMPLES - length)
        envelope[start : start + length] += rng.uniform(0.5, 1.0) * np.hanning(length)
    signal = rng.uniform(0.25, 0.9) * np.minimum(envelope, 1.0) * tone
    signal += rng.normal(0.0, rng.uniform(0.005, 0.03), size=AUDIO_SAMPLES)
    return np.clip(signal, -1.0, 1.0).astype(np.float32)


def synthesise_series(language: int, rng: np.random.Generator) -> np.ndarray:
    """A (3, 200) float32 IMU-like trace: language-specific oscillation, drift and noise."""
    t = np.arange(SERIES_SAMPLES) / SERIES_SAMPLES
    cycles = SERIES_CYCLES[language] * rng.uniform(0.95, 1.05)
    gains = np.asarray(SERIES_CHANNEL_GAIN[language])[:, None] * rng.uniform(0.6, 1.4)
    phases = rng.uniform(0, 2 * np.pi, size=(SERIES_CHANNELS, 1))
    series = gains * np.sin(2 * np.pi * cycles * t + phases)
    drift = rng.normal(0.0, 0.5, size=(SERIES_CHANNELS, 1)) * t  # slow linear drift
    offset = rng.normal(0.0, 0.3, size=(SERIES_CHANNELS, 1))
    noise = rng.normal(0.0, SERIES_NOISE, size=series.shape)
    return (series + drift + offset + noise).astype(np.float32)


def compose_text(classes_by_language: list[int], rng: np.random.Generator) -> str:
    """One number word per language (language i names class i), in shuffled order."""
    words = [NUMBER_WORDS[LANGUAGES[i]][c] for i, c in enumerate(classes_by_language)]
    return " ".join(words[i] for i in rng.permutation(len(words)))


def make_record(out_dir: Path, index: int, seed: int, languages: int, classes: int) -> dict:
    """Write one record's files under ``out_dir`` and return its manifest row."""
    # Independent streams per part, so changing one renderer leaves the others' bytes alone.
    meta, image_rng, audio_rng, series_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(4)
    )
    language = int(meta.integers(languages))
    classes_by_language = [int(c) for c in meta.integers(classes, size=languages)]
    text = compose_text(classes_by_language, meta)
    u = meta.random()
    split = next(name for name, upper in SPLITS if u < upper)
    label = classes_by_language[language]

    rid = f"rec-{index:06d}"
    row = {
        "id": rid,
        "image": f"images/{rid}.png",
        "audio": f"audio/{rid}.wav",
        "text": text,
        "timeseries": f"series/{rid}.npy",
        "split": split,
        "label": label,
        "language": LANGUAGES[language],
    }
    render_digit(label, image_rng).save(out_dir / row["image"], format="PNG")
    sf.write(
        out_dir / row["audio"],
        synthesise_audio(language, audio_rng),
        SAMPLE_RATE,
        subtype="PCM_16",
        format="WAV",
    )
    np.save(out_dir / row["timeseries"], synthesise_series(language, series_rng))
    return row


def generate(
    out_dir: str | Path,
    size: int = 1000,
    seed: int = 0,
    *,
    languages: int = 3,
    classes: int = 10,
    progress: bool = False,
) -> Path:
    """Write ``size`` records under ``out_dir`` and return the path of its manifest.csv."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not 1 <= languages <= len(LANGUAGES):
        raise ValueError(f"languages must be in 1..{len(LANGUAGES)}, got {languages}")
    if not 2 <= classes <= 10:
        raise ValueError(f"classes must be in 2..10, got {classes}")
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    manifest.unlink(missing_ok=True)  # a stale manifest must not vouch for half-written files
    for sub in ("images", "audio", "series"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)

    rows = []
    with console.progress(size, "demo data", unit="rec") if progress else nullcontext() as bar:
        for i in range(size):
            rows.append(make_record(out_dir, i, seed, languages, classes))
            if bar is not None:
                bar.update()
    _write_csv(manifest, COLUMNS, rows)  # written last: its presence means "complete"
    return manifest


def _write_csv(path: Path, fields: Sequence[str], rows: list[dict]) -> None:
    """Write ``rows`` as CSV atomically (a partial file never stands under ``path``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    partial = path.with_suffix(".csv.tmp")
    partial.write_text(buffer.getvalue(), encoding="utf-8")
    partial.replace(path)


def with_missing(
    manifest: str | Path, rate: float, columns: tuple[str, ...], seed: int = 0
) -> Path:
    """Write ``manifest-missing<rate>.csv`` beside ``manifest``: the same rows, with the cells
    of ``columns`` blank in ``round(rate * n_train)`` training rows each (chosen per column
    independently by ``seed``); other splits untouched. Returns its path."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"missing rate must be in [0, 1), got {rate}")
    manifest = Path(manifest)
    with manifest.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or ()), list(reader)
    if unknown := [c for c in columns if c not in fields or c in ("id", "split", "label")]:
        raise ValueError(f"cannot blank {unknown}: not modality columns of {manifest}")
    train = [i for i, row in enumerate(rows) if row["split"] == "train"]
    for k, column in enumerate(columns):  # one stream per column: columns blank independently
        rng = np.random.default_rng([seed, k, 0x6D697373])
        for i in rng.choice(train, size=round(rate * len(train)), replace=False):
            rows[i][column] = ""
    out = manifest.with_name(f"{manifest.stem}-missing{rate:g}.csv")
    _write_csv(out, fields, rows)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``demo-data DIR --size N --seed S --languages L --classes C``."""
    parser = argparse.ArgumentParser(
        prog="demo-data", description="Write the synthetic demo data set."
    )
    parser.add_argument("dir", help="output directory (created if missing)")
    parser.add_argument("--size", type=int, default=1000, help="number of records")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--languages", type=int, default=4, help=f"number of languages, 1..{len(LANGUAGES)}"
    )
    parser.add_argument("--classes", type=int, default=10, help="number of digit classes, 2..10")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = generate(
        args.dir,
        args.size,
        args.seed,
        languages=args.languages,
        classes=args.classes,
        progress=args.progress,
    )
    with manifest.open(encoding="utf-8", newline="") as f:
        splits = [row["split"] for row in csv.DictReader(f)]
    counts = " / ".join(f"{splits.count(name)} {name}" for name, _ in SPLITS)
    print(
        f"wrote {len(splits)} records ({counts}; {args.languages} languages, "
        f"{args.classes} classes) to {manifest} in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
