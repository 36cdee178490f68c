"""prepare_image: orientation, modes, resize and crop, draft decoding, and rejects."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from testdata import datagen
from prep.transform import RejectError, prepare_image


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _check(out: np.ndarray, shape: tuple[int, ...]) -> None:
    assert out.dtype == np.uint8
    assert out.shape == shape
    assert out.flags.c_contiguous


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    return datagen.render_images(np.array([3]), height=60, width=80, num_classes=5, rng=rng)[0]


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return datagen.make_image_folder(tmp_path_factory.mktemp("odd") / "p", classes=1, per_class=1,
                                     size=(64, 48), seed=5)


# --------------------------------------------------------------------------- orientation


def test_exif_orientation_is_applied(odd: dict) -> None:
    data = (odd["root"] / odd["special"]["exif_rotated"]).read_bytes()
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # as stored, unrotated
    assert stored.shape[:2] == (240, 320)
    out = prepare_image(data, None)
    _check(out, (320, 240, 3))
    # Orientation 6: the stored picture is shown turned 90 degrees clockwise.
    np.testing.assert_array_equal(out, np.rot90(stored, k=-1))


def test_unreadable_exif_keeps_the_image(photo: np.ndarray) -> None:
    data = _encode(Image.fromarray(photo), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7fjunk")
    _check(prepare_image(data, None), (60, 80, 3))


# --------------------------------------------------------------------------- modes


def _mode_cases(photo: np.ndarray) -> dict[str, tuple[bytes, np.ndarray | None]]:
    """mode -> (encoded image, expected RGB output or None to check only the shape)."""
    gray = photo[:, :, 1]
    rgb = Image.fromarray(photo)
    alpha = np.where(np.arange(80)[None, :] < 40, 0, 255).astype(np.uint8).repeat(60, 0)
    white_left = photo.copy()
    white_left[:, :40] = 255
    bits = (gray > 128)
    deep = gray.astype(np.uint16) * 257
    wide = (gray.astype(np.int32) * 256 + 7)
    floats = (gray / 255.0).astype(np.float32)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal_rgb = np.asarray(pal.convert("RGB"))
    transparent = int(np.asarray(pal)[0, 0])
    pal_alpha_expect = pal_rgb.copy()
    pal_alpha_expect[np.asarray(pal) == transparent] = 255
    return {
        "RGB": (_encode(rgb, "PNG"), photo),
        "L": (_encode(Image.fromarray(gray), "PNG"), np.dstack([gray] * 3)),
        "1": (_encode(Image.fromarray(bits), "PNG"), np.dstack([bits.astype(np.uint8) * 255] * 3)),
        "LA": (_encode(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG"),
               np.dstack([np.where(alpha == 0, 255, gray)] * 3)),
        "RGBA": (_encode(Image.fromarray(np.dstack([photo, alpha]), "RGBA"), "PNG"), white_left),
        "P": (_encode(pal, "PNG"), pal_rgb),
        "P+transparency": (_encode(pal, "PNG", transparency=transparent), pal_alpha_expect),
        "CMYK": (_encode(rgb.convert("CMYK"), "TIFF"), photo),
        "CMYK JPEG": (_encode(rgb.convert("CMYK"), "JPEG", quality=95), None),
        "I;16": (_encode(Image.fromarray(deep), "PNG"), np.dstack([gray] * 3)),
        "I": (_encode(Image.fromarray(wide), "TIFF"), np.dstack([gray] * 3)),
        "F": (_encode(Image.fromarray(floats), "TIFF"), np.dstack([gray] * 3)),
        "YCbCr JPEG": (_encode(rgb, "JPEG", quality=95), None),
    }


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "LA", "RGBA", "P", "P+transparency", "CMYK",
                                  "CMYK JPEG", "I;16", "I", "F", "YCbCr JPEG"])
def test_every_mode_becomes_8bit_rgb(photo: np.ndarray, mode: str) -> None:
    data, expected = _mode_cases(photo)[mode]
    stored_mode = Image.open(io.BytesIO(data)).mode
    assert stored_mode == mode.split("+")[0].split(" ")[0] or mode.endswith("JPEG")
    out = prepare_image(data, None)
    _check(out, (60, 80, 3))
    if expected is not None:
        np.testing.assert_array_equal(out, expected)
    else:
        assert _psnr(out, photo) > 30


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 256 * 4, dtype=np.uint16).reshape(4, 256)
    out = prepare_image(_encode(Image.fromarray(ramp), "PNG"), None)
    np.testing.assert_array_equal(out[..., 0], (ramp >> 8).astype(np.uint8))
    assert out.max() == 255 and len(np.unique(out)) > 200


# --------------------------------------------------------------------------- resize and crop


def _bands(width: int, height: int, vertical: bool = True) -> Image.Image:
    """Three bands (red, green, blue) across the longer side."""
    arr = np.zeros((height, width, 3), np.uint8)
    n = width if vertical else height
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        sl = slice(i * n // 3, (i + 1) * n // 3)
        if vertical:
            arr[:, sl] = colour
        else:
            arr[sl, :] = colour
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_shorter_side_resized_then_centre_cropped(fmt: str) -> None:
    options = {"quality": 95} if fmt == "JPEG" else {}
    landscape = prepare_image(_encode(_bands(300, 200), fmt, **options), 100)
    _check(landscape, (100, 100, 3))
    # The centre 200x200 of a 300-wide image keeps x in [50, 250): red, green, blue at 1:2:1.
    assert landscape[50, 10].argmax() == 0 and landscape[50, 50].argmax() == 1
    assert landscape[50, 90].argmax() == 2
    green = (landscape[50, :, 1] > 128) & (landscape[50, :, 0] < 128)
    assert 47 <= green.sum() <= 53
    portrait = prepare_image(_encode(_bands(200, 300, vertical=False), fmt), 64)
    _check(portrait, (64, 64, 3))
    assert portrait[6, 32].argmax() == 0 and portrait[32, 32].argmax() == 1
    assert portrait[58, 32].argmax() == 2


def test_size_none_keeps_native_size(photo: np.ndarray) -> None:
    _check(prepare_image(_encode(Image.fromarray(photo), "PNG"), None), (60, 80, 3))


def test_array_payloads(photo: np.ndarray) -> None:
    cifar = photo[:32, :32]
    out = prepare_image(cifar, None)
    _check(out, (32, 32, 3))
    np.testing.assert_array_equal(out, cifar)
    np.testing.assert_array_equal(prepare_image(cifar, 32), cifar)
    _check(prepare_image(cifar, 64), (64, 64, 3))
    _check(prepare_image(photo, 16), (16, 16, 3))
    chw = np.ascontiguousarray(cifar.transpose(2, 0, 1))
    _check(prepare_image(chw.transpose(1, 2, 0), None), (32, 32, 3))  # a non-contiguous view
    _check(prepare_image(cifar[:, :, 0], None), (32, 32, 3))
    with pytest.raises(RejectError, match="dtype"):
        prepare_image(cifar.astype(np.float32), None)
    with pytest.raises(RejectError, match="shape"):
        prepare_image(np.zeros((4, 4, 5), np.uint8), None)


def test_large_jpeg_uses_draft_mode_and_matches_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.arange(4000, dtype=np.float32)
    y = np.arange(3000, dtype=np.float32)[:, None]
    big = np.empty((3000, 4000, 3), np.uint8)
    big[..., 0] = 127 + 120 * np.sin(x / 97.0)
    big[..., 1] = 127 + 120 * np.cos(y / 131.0)
    big[..., 2] = 127 + 60 * np.sin(x / 173.0) + 60 * np.sin(y / 59.0)
    data = _encode(Image.fromarray(big), "JPEG", quality=90)

    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        scales.append((self.decoderconfig[0], self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = prepare_image(data, 512)
    _check(out, (512, 512, 3))
    assert len(scales) == 1
    scale, drafted = scales[0]
    assert scale == 4 and min(drafted) >= 512  # 3000 // 512 = 5 -> DCT scale 1/4

    # Reference: full decode, centre 3000x3000, high-quality resize.
    full = Image.open(io.BytesIO(data)).convert("RGB").crop((500, 0, 3500, 3000))
    reference = np.asarray(full.resize((512, 512), Image.Resampling.LANCZOS))
    assert _psnr(out, reference) > 30


def test_small_jpeg_skips_draft_mode(photo: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: calls.append(size))
    _check(prepare_image(_encode(Image.fromarray(photo), "JPEG"), 40), (40, 40, 3))
    assert calls == []


# --------------------------------------------------------------------------- rejects


@pytest.mark.parametrize(("kind", "reason"), [
    ("empty", r"empty file"),
    ("text", r"not an image \(unrecognised content\)"),
    ("truncated", r"truncated or corrupt image: image file is truncated.*"),
    ("corrupt", r"truncated or corrupt image: .+"),
    ("bomb", r"decompression bomb: 20000x20000 pixels exceeds limit 120000000"),
])
def test_bad_files_are_rejected_with_a_reason(odd: dict, kind: str, reason: str) -> None:
    rel = next(r for r, info in odd["files"].items() if info["kind"] == kind)
    data = (Path(odd["root"]) / rel).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RejectError) as err:
            prepare_image(data, 64)
    assert re.fullmatch(reason, err.value.reason), err.value.reason
    assert err.value.reason == str(err.value)


def test_bomb_below_pillows_hard_limit_is_rejected_quietly() -> None:
    # 11000x11000 is above our limit but only triggers Pillow's warning, not its error.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RejectError,
                           match=r"decompression bomb: 11000x11000 pixels exceeds limit 120000000"):
            prepare_image(datagen._png_bomb(11000, 11000), 64)
    with pytest.raises(RejectError, match=r"decompression bomb: 80x60 pixels exceeds limit 1000"):
        prepare_image(_encode(Image.new("RGB", (80, 60)), "PNG"), 64, max_pixels=1000)


def test_large_limit_admits_images_beyond_pillows_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would refuse 80x60 outright
    out = prepare_image(_encode(Image.new("RGB", (80, 60), (9, 8, 7)), "PNG"), 10, max_pixels=10_000)
    _check(out, (10, 10, 3))
    assert (out == (9, 8, 7)).all()


def test_nothing_but_reject_error_escapes(photo: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    seeds = [_encode(Image.fromarray(photo), fmt) for fmt in ("JPEG", "PNG", "WEBP", "TIFF", "GIF", "BMP")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in seeds:
            for _ in range(25):
                damaged = bytearray(data)
                for pos in rng.integers(0, len(damaged), 4):
                    damaged[pos] = int(rng.integers(0, 256))
                cut = bytes(damaged[: int(rng.integers(1, len(damaged) + 1))])
                for payload in (bytes(damaged), cut):
                    try:
                        out = prepare_image(payload, 24)
                    except RejectError:
                        continue
                    _check(out, (24, 24, 3))

