"""Tests for the synthetic Symile-M3-like demo data generator (pure numpy, no torch)."""

from __future__ import annotations

import csv
import hashlib
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipelines import demo_data
from pipelines.demo_data import LANGUAGES, NUMBER_WORDS

SIZE = 300
N_FIT = 200  # records 0..199 fit the centroids, 200..299 are held out


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    root = tmp_path_factory.mktemp("demo")
    manifest = demo_data.generate(root, size=SIZE, seed=0)
    assert manifest == root / "manifest.csv"
    return root, _read_manifest(manifest)


def test_manifest_columns_ids_and_splits(demo):
    root, rows = demo
    with (root / "manifest.csv").open(encoding="utf-8") as f:
        assert f.readline().strip() == "id,image,audio,text,timeseries,split,label,language"
    assert len(rows) == SIZE
    assert len({r["id"] for r in rows}) == SIZE
    assert rows[42]["id"] == "rec-000042"
    assert rows[42]["image"] == "images/rec-000042.png"
    assert rows[42]["audio"] == "audio/rec-000042.wav"
    assert rows[42]["timeseries"] == "series/rec-000042.npy"
    splits = Counter(r["split"] for r in rows[:200])
    assert set(splits) == {"train", "val", "test"}
    assert 0.7 < splits["train"] / 200 < 0.9


def test_files_exist_and_decode(demo):
    root, rows = demo
    for row in rows[:50]:
        with Image.open(root / row["image"]) as im:
            assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"
        audio, rate = sf.read(root / row["audio"], dtype="float32")
        info = sf.info(root / row["audio"])
        assert rate == 16_000 and audio.shape == (8000,) and info.subtype == "PCM_16"
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0.05
        series = np.load(root / row["timeseries"])
        assert series.shape == (3, 200) and series.dtype == np.float32
        assert np.isfinite(series).all()


def test_same_seed_is_byte_identical_and_order_independent(tmp_path, demo):
    a = demo_data.generate(tmp_path / "a", size=20, seed=0).parent
    b = demo_data.generate(tmp_path / "b", size=20, seed=0).parent
    assert _digest(a) == _digest(b)
    # Records depend only on (seed, index): a smaller run is a prefix of the big one.
    big = _digest(demo[0])
    media = {k: v for k, v in _digest(a).items() if k != "manifest.csv"}
    assert all(big[k] == v for k, v in media.items())
    c = demo_data.generate(tmp_path / "c", size=20, seed=1).parent
    other = _digest(c)
    assert other["manifest.csv"] != _digest(a)["manifest.csv"]
    assert sum(other[k] != v for k, v in media.items()) == len(media)


def test_text_structure_and_balance(demo):
    _, rows = demo
    vocab = [NUMBER_WORDS[name] for name in LANGUAGES[:3]]
    for row in rows:
        words = row["text"].split(" ")
        assert len(words) == 3
        assert NUMBER_WORDS[row["language"]][int(row["label"])] in words
        # Exactly one word per language, in some order.
        assert any(
            all(w in v for w, v in zip(p, vocab, strict=True))
            for p in itertools.permutations(words)
        )
    labels = Counter(int(r["label"]) for r in rows)
    languages = Counter(r["language"] for r in rows)
    assert set(labels) == set(range(10)) and max(labels.values()) < 3 * SIZE / 10
    assert set(languages) == set(LANGUAGES[:3]) and min(languages.values()) > SIZE / 3 * 0.7


def _candidate_labels(words: list[str], language: str | None, n_languages: int) -> set[int]:
    """Labels consistent with the text (and the language, if given) under any word->language
    assignment: the Bayes-optimal answer's support."""
    names = LANGUAGES[:n_languages]
    found = set()
    for perm in itertools.permutations(words):
        if all(w in NUMBER_WORDS[name] for w, name in zip(perm, names, strict=True)):
            for w, name in zip(perm, names, strict=True):
                if language in (None, name):
                    found.add(NUMBER_WORDS[name].index(w))
    return found


@pytest.mark.parametrize("languages", [2, 3, 5])
def test_text_and_language_jointly_determine_label(tmp_path, languages):
    rows = _read_manifest(demo_data.generate(tmp_path, size=150, seed=3, languages=languages))
    ambiguous_from_text_alone = 0
    for row in rows:
        words = row["text"].split(" ")
        assert len(words) == languages
        assert _candidate_labels(words, row["language"], languages) == {int(row["label"])}
        ambiguous_from_text_alone += len(_candidate_labels(words, None, languages)) > 1
    assert ambiguous_from_text_alone > 0.7 * len(rows)


def _nearest_centroid_accuracy(features: np.ndarray, targets: np.ndarray) -> float:
    fit_x, fit_y, test_x, test_y = (
        features[:N_FIT],
        targets[:N_FIT],
        features[N_FIT:],
        targets[N_FIT:],
    )
    labels = np.unique(fit_y)
    centroids = np.stack([fit_x[fit_y == k].mean(axis=0) for k in labels])
    distances = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((labels[distances.argmin(1)] == test_y).mean())


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pooled_spectrum(audio: np.ndarray, bands: int = 48) -> np.ndarray:
    """FFT magnitudes summed over log-spaced bands from 100 Hz to 8 kHz (a crude mel)."""
    magnitudes = np.abs(np.fft.rfft(audio))
    freqs = np.fft.rfftfreq(len(audio), d=1 / 16_000)
    edges = np.geomspace(100, 8000, bands + 1)
    return np.array(
        [
            magnitudes[(freqs >= lo) & (freqs < hi)].sum()
            for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        ]
    )


def test_audio_separates_languages(demo):
    root, rows = demo
    spectra = np.stack([_pooled_spectrum(sf.read(root / r["audio"])[0]) for r in rows])
    targets = np.array([r["language"] for r in rows])
    assert _nearest_centroid_accuracy(_normalise(spectra), targets) > 0.95


def test_series_separates_languages(demo):
    root, rows = demo
    spectra = np.stack(
        [np.abs(np.fft.rfft(np.load(root / r["timeseries"]), axis=1))[:, 2:].ravel() for r in rows]
    )
    targets = np.array([r["language"] for r in rows])
    assert _nearest_centroid_accuracy(_normalise(spectra), targets) > 0.95


def test_images_separate_digits(demo):
    root, rows = demo
    # Max over channels makes any bright stroke bright whatever its colour.
    pixels = np.stack(
        [np.asarray(Image.open(root / r["image"]), np.float32).max(-1).ravel() for r in rows]
    )
    pixels -= pixels.mean(axis=1, keepdims=True)
    targets = np.array([int(r["label"]) for r in rows])
    assert _nearest_centroid_accuracy(_normalise(pixels), targets) > 0.4  # chance is 0.1


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="languages"):
        demo_data.generate(tmp_path, size=5, languages=6)
    with pytest.raises(ValueError, match="classes"):
        demo_data.generate(tmp_path, size=5, classes=11)


def test_main_prints_summary(tmp_path, capsys):
    assert demo_data.main([str(tmp_path), "--size", "12", "--seed", "2", "--classes", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "wrote 12 records" in out
    rows = _read_manifest(tmp_path / "manifest.csv")
    assert {int(r["label"]) for r in rows} <= set(range(4))
