"""Every registered modality on real files: decode, preprocess, errors, encoder shapes."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from PIL import Image

from modalities import registry
from modalities.base import DecodeError

CONFIGS = {
    "image": {"kind": "image", "size": 16},
    "audio": {"kind": "audio", "duration_s": 0.25, "n_mels": 32},
    "text": {"kind": "text", "tokenizer": "byte", "max_length": 12, "vocab_size": 384},
    "timeseries": {"kind": "timeseries", "channels": 2, "length": 50},
}


def _cfg(kind: str, **changes):
    return registry.get(kind).Config.model_validate({**CONFIGS[kind], **changes})


def _processor(kind: str, **changes):
    cfg = _cfg(kind, **changes)
    return registry.get(kind).Processor(cfg, None), cfg


def test_registry_lists_every_kind_and_rejects_unknown():
    assert registry.names() == ["audio", "image", "text", "timeseries"]
    with pytest.raises(ValueError, match="valid: audio, image"):
        registry.get("video")


@pytest.mark.parametrize("kind", registry.names())
def test_encoder_maps_dummy_batch_to_embeddings(kind):
    module = registry.get(kind)
    cfg = _cfg(kind)
    batch = {
        s: torch.as_tensor(v) for s, v in module.dummy_batch(cfg, 4).items() if v.dtype.kind != "O"
    }
    out = module.build_encoder(cfg, 8)(batch)
    assert out.shape == (4, 8) and torch.isfinite(out).all()
    spec = module.output_spec(cfg)
    for suffix, array in module.dummy_batch(cfg, 4).items():
        assert array.dtype == spec[suffix][0] and array.shape[1:] == spec[suffix][1]


def _png(mode: str, size=(40, 24), fmt="PNG", **save) -> bytes:
    colour = {"L": 128, "LA": (128, 200), "RGBA": (10, 20, 30, 128), "CMYK": (0, 50, 100, 0)}
    image = Image.new(mode, size, colour.get(mode, (200, 30, 60)))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "PNG"),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("P", "GIF"),
    ],
)
def test_image_decodes_any_mode_to_rgb_square(mode, fmt):
    processor, cfg = _processor("image")
    pixels = processor.decode(_png(mode, fmt=fmt))
    assert pixels.shape == (3, 16, 16) and pixels.dtype == np.uint8
    assert processor.preprocess([pixels, pixels])[""].shape == (2, 3, 16, 16)


def test_image_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    processor = registry.get("image").Processor(_cfg("image", size=8), None)
    assert processor.decode(buffer.getvalue()).shape == (3, 8, 8)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "empty_file"),
        (b"not an image at all", "unsupported_format"),
        (_png("RGB", size=(64, 64))[:60], "corrupt"),
    ],
)
def test_image_errors(data, kind):
    processor, _ = _processor("image")
    with pytest.raises(DecodeError) as info:
        processor.decode(data)
    assert info.value.kind == kind


def test_image_pixel_bomb_rejected_before_decoding():
    processor, _ = _processor("image", max_pixels=1000)
    with pytest.raises(DecodeError) as info:
        processor.decode(_png("RGB", size=(100, 100)))
    assert info.value.kind == "too_large"


def _wav(samples: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, subtype=subtype, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("channels", "rate", "subtype", "fmt"),
    [
        (1, 16000, "PCM_16", "WAV"),
        (2, 44100, "PCM_U8", "WAV"),
        (1, 22050, "PCM_24", "FLAC"),
        (2, 8000, "VORBIS", "OGG"),
        (1, 24000, "MPEG_LAYER_III", "MP3"),
    ],
)
def test_audio_decodes_resamples_and_mel(channels, rate, subtype, fmt):
    t = np.arange(int(rate * 0.4)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    samples = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    processor, cfg = _processor("audio")
    wave = processor.decode(_wav(samples, rate, subtype, fmt))
    assert wave.shape == (cfg.num_samples,)
    mel = processor.preprocess([wave])[""]
    assert mel.shape == (1, cfg.n_mels, cfg.num_frames) and mel.dtype == np.float16
    assert np.isfinite(mel.astype(np.float32)).all()


@pytest.mark.parametrize(
    ("rate", "n_mels", "duration_s"), [(16000, 64, 0.5), (16000, 128, 1.0), (22050, 40, 0.3)]
)
def test_audio_log_mel_equals_torchaudio(rate, n_mels, duration_s):
    """The numpy log-mel is torchaudio's MelSpectrogram (+ log, float16) within one float16
    ulp, and differs from it in under 1% of the values."""
    import torchaudio

    processor, cfg = _processor("audio", sample_rate=rate, n_mels=n_mels, duration_s=duration_s)
    rng = np.random.default_rng(rate + n_mels)
    gains = rng.uniform(0.001, 1.0, (12, 1))
    waves = (rng.standard_normal((12, cfg.num_samples)) * gains).astype(np.float32)
    waves[0] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(cfg.num_samples) / rate)
    ours = processor.preprocess(list(waves))[""]
    window = round(rate * cfg.window_ms / 1000)
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=rate,
        n_fft=window,
        win_length=window,
        hop_length=cfg.hop_length,
        n_mels=n_mels,
    )
    with torch.no_grad():
        theirs = torch.log(mel(torch.from_numpy(waves)) + 1e-6).to(torch.float16).numpy()
    assert ours.shape == theirs.shape == (12, n_mels, cfg.num_frames)
    assert ours.dtype == np.float16
    # rtol 2**-10 is one float16 ulp; atol covers values near 0, where the ulp is tiny
    np.testing.assert_allclose(ours.astype(np.float32), theirs, rtol=2**-10, atol=2e-3)
    assert (ours != theirs).mean() < 0.01


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_audio_resampling_equals_torchaudio(rate):
    import torchaudio

    from modalities.audio import resample

    wave = np.random.default_rng(rate).standard_normal(rate // 3).astype(np.float32)
    theirs = torchaudio.functional.resample(torch.from_numpy(wave), rate, 16000).numpy()
    ours = resample(wave, rate, 16000)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_audio_waveform_representation_and_padding():
    processor, cfg = _processor("audio", representation="waveform")
    short = processor.decode(_wav(np.full(100, 0.25), 16000))
    assert short.shape == (cfg.num_samples,) and np.all(short[100:] == 0)
    assert processor.preprocess([short])[""].shape == (1, cfg.num_samples)


@pytest.mark.parametrize(
    ("data", "kind"),
    [(b"", "empty_file"), (b"RIFF garbage that is not audio", "unsupported_format")],
)
def test_audio_errors(data, kind):
    processor, _ = _processor("audio")
    with pytest.raises(DecodeError) as info:
        processor.decode(data)
    assert info.value.kind == kind


def test_audio_truncated_wav_is_quarantinable():
    processor, _ = _processor("audio")
    with pytest.raises(DecodeError) as info:
        processor.decode(_wav(np.zeros(16000), 16000)[:30])
    assert info.value.kind in {"corrupt", "unsupported_format"}


def test_text_tokenises_and_rejects_bad_input():
    processor, cfg = _processor("text")
    out = processor.preprocess([processor.decode("héllo wörld".encode()), "x" * 500])
    assert out["input_ids"].shape == (2, 12) and out["attention_mask"][1].all()
    assert list(out[""]) == ["héllo wörld", "x" * 500]
    for data, kind in [(b"\xff\xfe\xfa", "invalid_utf8"), (b"  \n ", "empty_text")]:
        with pytest.raises(DecodeError) as info:
            processor.decode(data)
        assert info.value.kind == kind


def test_wordlevel_tokenizer_is_fitted_on_the_data():
    module = registry.get("text")
    cfg = _cfg("text", tokenizer="wordlevel", vocab_size=None)
    assets = module.fit_assets(cfg, ["un deux trois", "one two three", "eins zwei drei"])
    processor = module.Processor(cfg, assets)
    ids = processor.preprocess(["deux three", "unseen words"])["input_ids"]
    assert module.vocab_size(cfg, assets) == 3 + 9
    assert ids[0, 0] > 2 and ids[1, 0] == 1  # known word vs [UNK]


def _series_bytes(array: np.ndarray, fmt: str) -> bytes:
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()
    if fmt == "csv":
        return "\n".join(",".join(map(str, row)) for row in array.T).encode()
    buffer = io.BytesIO()
    pq.write_table(pa.table({f"c{i}": row for i, row in enumerate(array)}), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["npy", "csv", "parquet"])
def test_timeseries_formats_resample_and_normalise(fmt):
    processor, cfg = _processor("timeseries")
    raw = np.stack([np.linspace(0, 10, 80), np.sin(np.arange(80))])
    series = processor.decode(_series_bytes(raw, fmt))
    assert series.shape == (2, 50) and series.dtype == np.float32
    np.testing.assert_allclose(series.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(series.std(1), 1, atol=1e-3)


def test_timeseries_nan_policies():
    raw = np.stack([np.arange(20.0), np.arange(20.0)])
    raw[0, 5] = np.nan
    with pytest.raises(DecodeError) as info:
        _processor("timeseries")[0].decode(_series_bytes(raw, "npy"))
    assert info.value.kind == "non_finite"
    filled = _processor("timeseries", nan_policy="interpolate")[0].decode(_series_bytes(raw, "npy"))
    assert np.isfinite(filled).all()
    raw[1, :] = np.nan
    with pytest.raises(DecodeError, match="no finite"):
        _processor("timeseries", nan_policy="interpolate")[0].decode(_series_bytes(raw, "npy"))


def test_timeseries_wrong_shape():
    with pytest.raises(DecodeError) as info:
        _processor("timeseries")[0].decode(_series_bytes(np.zeros((3, 10)), "npy"))
    assert info.value.kind == "bad_shape"


def _table_bytes(table: np.ndarray, fmt: str, header: list[str] | None = None) -> bytes:
    """A file holding the 2-D ``table`` as stored: CSV/Parquet rows x columns, or the array."""
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, table)
        return buffer.getvalue()
    if fmt == "csv":
        rows = ([",".join(header)] if header else []) + [",".join(map(str, r)) for r in table]
        return "\n".join(rows).encode()
    buffer = io.BytesIO()
    pq.write_table(pa.table({f"c{i}": column for i, column in enumerate(table.T)}), buffer)
    return buffer.getvalue()


RAW = np.stack([np.linspace(0, 10, 80), np.sin(np.arange(80))])  # (channels, samples)


@pytest.mark.parametrize("fmt", ["csv", "npy", "parquet"])
@pytest.mark.parametrize("layout", ["samples_by_channels", "channels_by_samples"])
def test_timeseries_layout_states_the_orientation_of_every_format(fmt, layout):
    table = RAW.T if layout == "samples_by_channels" else RAW
    processor, _ = _processor("timeseries", layout=layout)
    expected = _processor("timeseries")[0].decode(_series_bytes(RAW, "npy"))
    np.testing.assert_array_equal(processor.decode(_table_bytes(table, fmt)), expected)
    other = "channels_by_samples" if layout == "samples_by_channels" else "samples_by_channels"
    with pytest.raises(DecodeError, match=f"the file fits {other}") as info:
        processor.decode(_table_bytes(table.T, fmt))  # the other orientation
    assert info.value.kind == "bad_shape"


@pytest.mark.parametrize(("fmt", "table"), [("csv", RAW.T), ("parquet", RAW.T), ("npy", RAW)])
def test_timeseries_without_layout_keeps_each_formats_convention(fmt, table):
    processor, _ = _processor("timeseries")
    series = processor.decode(_table_bytes(table, fmt))
    np.testing.assert_array_equal(series, processor.decode(_series_bytes(RAW, "npy")))


@pytest.mark.parametrize(
    "header", [None, ["lead_I", "lead_II"], ['"lead I"', " lead II "]], ids=str
)
def test_timeseries_csv_with_or_without_a_header_row(header):
    processor, _ = _processor("timeseries")
    data = _table_bytes(RAW.T, "csv", header)
    np.testing.assert_array_equal(
        processor.decode(data), processor.decode(_table_bytes(RAW.T, "csv"))
    )
    commented = b"# exported by a recorder\n\n" + data
    np.testing.assert_array_equal(processor.decode(commented), processor.decode(data))


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"lead_I,lead_II\n", "bad_shape"),  # a header and no rows
        (b"lead_I,2.5\n1,2\n3,4\n", "unsupported_format"),  # half a header is not one
        (b"1,2\nx,y\n3,4\n", "unsupported_format"),  # only the first row may be names
    ],
)
def test_timeseries_csv_header_edge_cases_are_rejected(data, kind):
    with pytest.raises(DecodeError) as info:
        _processor("timeseries")[0].decode(data)
    assert info.value.kind == kind


def test_timeseries_bad_shape_names_the_expected_shape_and_the_layout_field():
    processor, _ = _processor("timeseries")
    with pytest.raises(DecodeError) as info:
        processor.decode(_table_bytes(RAW.T, "npy"))  # (samples, channels) under the NPY default
    assert info.value.message == (
        "npy series of shape (80, 2): layout channels_by_samples (the NPY default) expects "
        "(2 channels, samples >= 2); the file fits samples_by_channels: set the timeseries "
        "column's `layout: samples_by_channels`"
    )
    with pytest.raises(DecodeError) as info:
        _processor("timeseries", layout="samples_by_channels")[0].decode(
            _table_bytes(np.zeros((80, 3)), "csv")
        )
    assert info.value.message == (
        "csv series of shape (80, 3): layout samples_by_channels (the `layout` field) expects "
        "(samples >= 2, 2 channels)"
    )


@pytest.mark.parametrize("kind", registry.names())
def test_every_modality_declares_its_preprocessing_version(kind):
    version = registry.get(kind).PREPROCESSING_VERSION
    assert isinstance(version, int) and version >= 1


def test_text_loads_a_transformers_tokenizer_from_a_local_path(tmp_path):
    module = registry.get("text")
    fitted_cfg = _cfg("text", tokenizer="wordlevel", vocab_size=None)
    assets = module.fit_assets(fitted_cfg, ["alpha beta gamma", "beta delta"])
    module.load_tokenizer(fitted_cfg, assets).save_pretrained(tmp_path / "tok")
    processor, _ = _processor("text", tokenizer=str(tmp_path / "tok"))
    ids = processor.preprocess(["beta gamma"])["input_ids"][0]
    assert list(ids[:2]) == list(
        module.Processor(fitted_cfg, assets).preprocess(["beta gamma"])["input_ids"][0][:2]
    )
