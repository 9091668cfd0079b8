"""runtime.inputs: user images for DDIM inversion and image-to-image, and their model space."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.config import NormalizationConfig
from runtime.images import to_uint8
from runtime.inputs import InputError, read_images, to_model_space

RNG = np.random.default_rng(0)


def rgb(h: int = 32, w: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def grey(h: int = 32, w: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (h, w), dtype=np.uint8)


def save(path: Path, arr_or_image, **options) -> Path:
    im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    im.save(path, **options)
    return path


def refused(match: str, *args, **kwargs) -> str:
    """read_images(*args) must fail with one line matching ``match``."""
    with pytest.raises(ValueError, match=match) as info:
        read_images(*args, **kwargs)
    assert isinstance(info.value, InputError)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    return msg


# --- files and folders ------------------------------------------------------------------------------------------


def test_png_grey_and_rgb(tmp_path):
    g, c = grey(), rgb()
    imgs, names = read_images(save(tmp_path / "g.png", g), 32, 1)
    assert imgs.shape == (1, 32, 32, 1) and imgs.dtype == np.uint8 and names == ["g.png"]
    np.testing.assert_array_equal(imgs[0, ..., 0], g)
    imgs, names = read_images(save(tmp_path / "c.png", c), 32, 3)
    assert imgs.shape == (1, 32, 32, 3) and names == ["c.png"]
    np.testing.assert_array_equal(imgs[0], c)


def test_jpeg(tmp_path):
    c = np.full((32, 32, 3), (200, 40, 90), dtype=np.uint8)
    imgs, _ = read_images(save(tmp_path / "c.jpg", c, quality=95), 32, 3)
    assert imgs.shape == (1, 32, 32, 3)
    assert np.abs(imgs[0].astype(int) - c).max() <= 8
    imgs, _ = read_images(save(tmp_path / "g.jpeg", grey()), 32, 1)
    assert imgs.shape == (1, 32, 32, 1)


def test_folder_sorted_hidden_and_subfolders_skipped(tmp_path):
    a, b = grey(), grey()
    save(tmp_path / "b.png", b)
    save(tmp_path / "a.bmp", a)
    save(tmp_path / ".hidden.png", grey())
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "sub").mkdir()
    save(tmp_path / "sub" / "c.png", grey())
    imgs, names = read_images(tmp_path, 32, 1)
    assert names == ["a.bmp", "b.png"]
    np.testing.assert_array_equal(imgs[..., 0], np.stack([a, b]))


def test_missing_path(tmp_path):
    refused("nope.png does not exist", tmp_path / "nope.png", 32, 3)


def test_empty_folder(tmp_path):
    (tmp_path / ".hidden").write_bytes(b"")
    refused("holds no images", tmp_path, 32, 3)


def test_non_image_in_folder_is_an_error(tmp_path):
    save(tmp_path / "a.png", rgb())
    (tmp_path / "x.png").write_text("not an image\nat all\n")
    refused(r"x\.png is not an image Pillow can read", tmp_path, 32, 3)
    refused(r"x\.png is not an image Pillow can read", tmp_path / "x.png", 32, 3)


def test_truncated_image(tmp_path):
    data = io.BytesIO()
    Image.fromarray(rgb()).save(data, format="PNG")
    (tmp_path / "t.png").write_bytes(data.getvalue()[:100])
    refused(r"t\.png is not an image Pillow can read \(", tmp_path / "t.png", 32, 3)


def test_colour_image_for_grey_model(tmp_path):
    msg = refused(r"has 3 channels \(RGB\); the model takes 1 \(grey\)", save(tmp_path / "c.png", rgb()), 32, 1)
    assert "c.png" in msg


def test_grey_image_for_colour_model(tmp_path):
    refused(r"g\.png has 1 channel \(grey\); the model takes 3 \(RGB\)", save(tmp_path / "g.png", grey()), 32, 3)


def test_bilevel_image_is_grey(tmp_path):
    bits = RNG.integers(0, 2, (32, 32)).astype(bool)
    imgs, _ = read_images(save(tmp_path / "b.png", Image.fromarray(bits)), 32, 1)
    np.testing.assert_array_equal(imgs[0, ..., 0], np.where(bits, 255, 0))


def test_opaque_alpha_is_dropped(tmp_path):
    c = rgb()
    rgba = np.concatenate([c, np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    imgs, _ = read_images(save(tmp_path / "o.png", rgba), 32, 3)
    np.testing.assert_array_equal(imgs[0], c)
    g = grey()
    la = Image.fromarray(np.stack([g, np.full_like(g, 255)], axis=-1), mode="LA")
    imgs, _ = read_images(save(tmp_path / "la.png", la), 32, 1)
    np.testing.assert_array_equal(imgs[0, ..., 0], g)


def test_transparency_is_an_error(tmp_path):
    rgba = np.concatenate([rgb(), np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    rgba[3, 4, 3] = 0
    refused(r"t\.png has transparent pixels", save(tmp_path / "t.png", rgba), 32, 3)
    g = Image.fromarray(np.zeros((32, 32), np.uint8))  # a tRNS colour: every black pixel is transparent
    refused(r"k\.png has transparent pixels", save(tmp_path / "k.png", g, transparency=0), 32, 1)


def test_palette_images(tmp_path):
    colour = Image.fromarray(rgb()).quantize(16)
    assert colour.mode == "P"
    imgs, _ = read_images(save(tmp_path / "p.png", colour), 32, 3)
    np.testing.assert_array_equal(imgs[0], np.asarray(colour.convert("RGB")))
    refused(r"p\.png has 3 channels \(RGB\); the model takes 1", tmp_path / "p.png", 32, 1)

    g = grey()
    # the web palette holds few greys: map through an explicit palette of all 256
    greys = Image.fromarray(g).convert("RGB").quantize(palette=_grey_palette())
    assert greys.mode == "P"
    imgs, _ = read_images(save(tmp_path / "pg.png", greys), 32, 1)
    np.testing.assert_array_equal(imgs[0, ..., 0], np.asarray(greys.convert("L")))
    refused(r"pg\.png has 1 channel \(grey\); the model takes 3", tmp_path / "pg.png", 32, 3)

    transparent = colour.copy()
    transparent.info["transparency"] = int(np.asarray(colour)[0, 0])
    refused(r"pt\.png has transparent pixels", save(tmp_path / "pt.png", transparent), 32, 3)


def _grey_palette() -> Image.Image:
    pal = Image.new("P", (1, 1))
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    return pal


def test_sixteen_bit_is_refused(tmp_path):
    im = Image.fromarray(RNG.integers(0, 65536, (32, 32), dtype=np.uint16))
    save(tmp_path / "d.png", im)
    with Image.open(tmp_path / "d.png") as check:
        assert check.mode.startswith("I")
    refused(r"d\.png is a (16-bit grey|32-bit integer) image .*8-bit grey or RGB", tmp_path / "d.png", 32, 1)


def test_exif_orientation_is_applied(tmp_path):
    arr = grey(16, 32)  # 32 wide, 16 high; orientation 6 shows it rotated: 16 wide, 32 high
    exif = Image.Exif()
    exif[0x0112] = 6
    save(tmp_path / "r.png", arr, exif=exif)
    imgs, _ = read_images(tmp_path / "r.png", 16, 1, resize=True)
    assert imgs.shape == (1, 16, 16, 1)
    refused(r"r\.png is 16x32; ", tmp_path / "r.png", 16, 1)


def test_wrong_size(tmp_path):
    msg = refused(r"w\.png is 64x48; the model takes 32x32 images \(pass --resize to centre-crop and resize\)",
                  save(tmp_path / "w.png", rgb(48, 64)), 32, 3)
    assert msg.endswith("resize)")


def test_resize_output_shape(tmp_path):
    save(tmp_path / "a.png", rgb(48, 64))
    save(tmp_path / "b.png", rgb(20, 20))  # upscaled
    save(tmp_path / "c.png", rgb(32, 32))  # kept as it is
    imgs, names = read_images(tmp_path, 32, 3, resize=True)
    assert imgs.shape == (3, 32, 32, 3) and names == ["a.png", "b.png", "c.png"]
    np.testing.assert_array_equal(imgs[2], np.asarray(Image.open(tmp_path / "c.png")))


def test_resize_keeps_the_centred_square(tmp_path):
    centre = rgb(32, 32)
    wide = np.zeros((32, 48, 3), np.uint8)
    wide[:, :8] = 255
    wide[:, 8:40] = centre
    wide[:, 40:] = 255
    imgs, _ = read_images(save(tmp_path / "wide.png", wide), 32, 3, resize=True)
    np.testing.assert_array_equal(imgs[0], centre)  # same side: cropped, not resampled

    tall = np.zeros((96, 64), np.uint8)  # a flat centre square between black bands: shrunk, it stays flat
    tall[16:80] = 100
    imgs, _ = read_images(save(tmp_path / "tall.png", tall), 16, 1, resize=True)
    assert imgs.shape == (1, 16, 16, 1)
    assert np.abs(imgs.astype(int) - 100).max() <= 1


def test_too_many_images(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", grey())
    refused(r"holds 3 files; at most 2 images", tmp_path, 32, 1, limit=2)
    np.savez(tmp_path.parent / "many.npz", images=np.zeros((3, 32, 32, 1), np.uint8))
    refused(r"many\.npz holds 3 images; at most 2", tmp_path.parent / "many.npz", 32, 1, limit=2)


def test_name_with_a_newline_stays_one_line(tmp_path):
    (tmp_path / "bad\nname.png").write_bytes(b"nope")
    msg = refused("is not an image Pillow can read", tmp_path, 32, 3)
    assert "bad\\nname.png" in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="channels must be 1"):
        read_images(Path("."), 32, 4)
    with pytest.raises(ValueError, match="size must be"):
        read_images(Path("."), 0, 3)


# --- npz --------------------------------------------------------------------------------------------------------


def test_npz_images(tmp_path):
    arr = RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", samples=np.zeros((3, 3, 32, 32), np.float32), images=arr)
    imgs, names = read_images(tmp_path / "s.npz", 32, 3)
    np.testing.assert_array_equal(imgs, arr)
    assert names == ["s.npz[0]", "s.npz[1]", "s.npz[2]"]
    np.savez_compressed(tmp_path / "g.npz", images=arr[..., 0])  # (N, H, W): one channel
    imgs, _ = read_images(tmp_path / "g.npz", 32, 1)
    np.testing.assert_array_equal(imgs[..., 0], arr[..., 0])


def test_npz_without_images(tmp_path):
    np.savez(tmp_path / "s.npz", samples=np.zeros((2, 3, 8, 8), np.float32))
    refused(r"s\.npz holds no 'images' array \(it has: samples\)", tmp_path / "s.npz", 8, 3)


def test_npz_wrong_dtype_ndim_and_count(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 8, 8, 3), np.float32))
    refused(r"f\.npz: 'images' is float32, not uint8", tmp_path / "f.npz", 8, 3)
    np.savez(tmp_path / "o.npz", images=np.array([None, 1], dtype=object))
    refused(r"o\.npz: 'images' is .*not uint8", tmp_path / "o.npz", 8, 3)
    np.savez(tmp_path / "d.npz", images=np.zeros((8, 8), np.uint8))
    refused(r"d\.npz: 'images' has shape \(8, 8\)", tmp_path / "d.npz", 8, 1)
    np.savez(tmp_path / "z.npz", images=np.zeros((0, 8, 8, 3), np.uint8))
    refused(r"z\.npz holds 0 images", tmp_path / "z.npz", 8, 3)


def test_npz_channels_and_size(tmp_path):
    np.savez(tmp_path / "c.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    refused(r"c\.npz holds images of 3 channels \(RGB\); the model takes 1 \(grey\)", tmp_path / "c.npz", 8, 1)
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 8, 8, 4), np.uint8))
    refused(r"a\.npz holds images of 4 channels; the model takes 3 \(RGB\)", tmp_path / "a.npz", 8, 3)
    np.savez(tmp_path / "w.npz", images=np.zeros((2, 12, 16, 3), np.uint8))
    refused(r"w\.npz holds images of 16x12; the model takes 8x8 images \(pass --resize",
            tmp_path / "w.npz", 8, 3)
    arr = np.zeros((2, 12, 16, 3), np.uint8)
    arr[:, :, 2:14] = 77  # the centre 12x12 square, flat
    np.savez(tmp_path / "r.npz", images=arr)
    imgs, names = read_images(tmp_path / "r.npz", 8, 3, resize=True)
    assert imgs.shape == (2, 8, 8, 3) and names == ["r.npz[0]", "r.npz[1]"]
    assert np.abs(imgs.astype(int) - 77).max() <= 1
    np.savez(tmp_path / "rg.npz", images=arr[..., 0])
    imgs, _ = read_images(tmp_path / "rg.npz", 8, 1, resize=True)
    assert imgs.shape == (2, 8, 8, 1)


def test_npy_renamed_npz(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    refused(r"a\.npz is a single \.npy array, not an \.npz", tmp_path / "a.npz", 8, 3)


def test_truncated_and_foreign_npz(tmp_path):
    np.savez(tmp_path / "full.npz", images=RNG.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "torn.npz").write_bytes(data[: len(data) // 2])
    refused(r"torn\.npz is not a readable \.npz file", tmp_path / "torn.npz", 16, 3)
    (tmp_path / "text.npz").write_text("hello\nworld\n")
    refused(r"text\.npz is not a readable \.npz file", tmp_path / "text.npz", 16, 3)
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as zf:  # a zip whose 'images' member is no array
        zf.writestr("images.npy", b"garbage\nmore garbage")
    refused(r"bad\.npz is not a readable \.npz file", tmp_path / "bad.npz", 16, 3)


def test_npz_with_a_lying_header(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 16, 16, 3), np.uint8))
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf:  # intact zip, array data cut short
        zf.writestr("images.npy", buf.getvalue()[:-100])
    refused(r"short\.npz is not a readable \.npz file", tmp_path / "short.npz", 16, 3)


# --- model space ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean, std", [
    ((0.5,), (0.5,)),
    ((0.2860,), (0.3530,)),
    ((0.0,), (1.0,)),
    ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
def test_round_trip_is_exact(mean, std):
    c = len(mean)
    u = RNG.integers(0, 256, (4, 9, 7, c), dtype=np.uint8)
    every = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(c, axis=-1)
    norm = NormalizationConfig(mean, std)
    for arr in (u, every):
        x = to_model_space(arr, mean, std)
        assert x.dtype == np.float32 and x.shape == (arr.shape[0], c, arr.shape[1], arr.shape[2])
        assert x.flags.c_contiguous
        np.testing.assert_array_equal(to_uint8(x, norm), arr)


def test_model_space_values():
    u = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1)
    x = to_model_space(u, (0.5,), (0.5,))
    np.testing.assert_allclose(x[0, 0, 0], [-1.0, -0.6, 1.0], rtol=0, atol=1e-6)


def test_model_space_refuses_bad_input():
    with pytest.raises(ValueError, match=r"expected \(N, H, W, C\) uint8"):
        to_model_space(np.zeros((2, 8, 8, 3), np.float32), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="normalization has 1 mean"):
        to_model_space(np.zeros((2, 8, 8, 3), np.uint8), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="std > 0"):
        to_model_space(np.zeros((2, 8, 8, 1), np.uint8), (0.5,), (0.0,))
