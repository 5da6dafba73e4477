"""resnet_task.jpeg: simplejpeg and Pillow give the same pixels; bad files keep Pillow's verdict."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from resnet_task import jpeg
from resnet_task.image_folder import decode_image
from resnet_task.imagenet import center_crop_box, decode_crop, sample_crop_box

needs_simplejpeg = pytest.mark.skipif(jpeg.simplejpeg is None, reason="simplejpeg not installed")


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth structure plus noise: realistic JPEG content at a small size."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    return (base + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8)


def _encoded(height, width, mode="RGB", fmt="JPEG", seed=0, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo(height, width, seed)).convert(mode).save(buf, fmt, **save)
    return buf.getvalue()


def _decodes(data: bytes) -> list[np.ndarray]:
    draws = np.random.default_rng(len(data)).uniform(size=(10, 4))
    return [
        decode_crop(io.BytesIO(data), lambda h, w: sample_crop_box(h, w, draws), 24),
        decode_crop(io.BytesIO(data), lambda h, w: sample_crop_box(h, w, draws), 96),
        decode_crop(io.BytesIO(data), lambda h, w: center_crop_box(h, w, 40), 40),
        decode_image(io.BytesIO(data), 20),
    ]


FILES = [  # sizes not divisible by 8, every chroma subsampling, progressive, grey, CMYK, PNG
    *(dict(height=h, width=w, subsampling=sub, progressive=prog, quality=90)
      for (h, w), sub, prog in itertools.product([(375, 500), (301, 203)], [0, 1, 2],
                                                 [False, True])),
    dict(height=250, width=330, mode="L", quality=85),
    dict(height=250, width=330, mode="CMYK", quality=85),
    dict(height=120, width=90, fmt="PNG"),
]


@needs_simplejpeg
@pytest.mark.parametrize("spec", FILES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_simplejpeg_gives_pillows_pixels_exactly(spec, monkeypatch):
    data = _encoded(**spec)
    monkeypatch.setenv(jpeg.ENV_VAR, "pillow")
    reference = _decodes(data)
    monkeypatch.setenv(jpeg.ENV_VAR, "simplejpeg")
    used = []
    real = jpeg.simplejpeg.decode_jpeg
    monkeypatch.setattr(jpeg.simplejpeg, "decode_jpeg",
                        lambda *a, **k: used.append(k["min_factor"]) or real(*a, **k))
    for got, want in zip(_decodes(data), reference, strict=True):
        np.testing.assert_array_equal(got, want)
    handled = spec.get("fmt", "JPEG") == "JPEG" and spec.get("mode") != "CMYK"
    assert bool(used) == handled  # PNG and CMYK go to Pillow
    if handled and spec["height"] == 375:
        assert 8 in used and min(used) < 8  # a 24 px crop decodes at 1/8, a 96 px one finer


@pytest.mark.parametrize("decoder", ["pillow", pytest.param("simplejpeg", marks=needs_simplejpeg)])
def test_a_truncated_jpeg_fails_with_pillows_error_under_either_decoder(decoder, monkeypatch):
    monkeypatch.setenv(jpeg.ENV_VAR, decoder)
    data = _encoded(375, 500, quality=90)
    with pytest.raises(OSError, match="truncated"):
        decode_crop(io.BytesIO(data[: len(data) // 2]), lambda h, w: (0, 0, h, w), 32)
    with pytest.raises(Image.UnidentifiedImageError):
        decode_image(io.BytesIO(b"\xff\xd8\xff" + b"\0" * 50), 32)


def test_the_decoder_follows_the_environment(monkeypatch):
    monkeypatch.setenv(jpeg.ENV_VAR, "pillow")
    assert jpeg.decoder_name() == "pillow"
    monkeypatch.setenv(jpeg.ENV_VAR, "Auto")
    assert jpeg.decoder_name() == ("pillow" if jpeg.simplejpeg is None else "simplejpeg")
    monkeypatch.setenv(jpeg.ENV_VAR, "turbo")
    with pytest.raises(ValueError, match="choose one of auto, pillow, simplejpeg"):
        jpeg.decoder_name()
    monkeypatch.setattr(jpeg, "simplejpeg", None)
    monkeypatch.setenv(jpeg.ENV_VAR, "simplejpeg")
    with pytest.raises(ImportError, match=r"nnx-trainer\[jpeg\]"):
        jpeg.decoder_name()
    monkeypatch.delenv(jpeg.ENV_VAR)
    assert jpeg.decoder_name() == "pillow"  # auto without simplejpeg
