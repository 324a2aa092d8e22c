"""Images: decoding to RGB, the budget sizing rule, the resize, and patches equal to transformers'.

The oracle for sizing and patches is transformers' own helper functions (tests/media_oracle.py)
run on the same resized image; the resize (torchvision's, unavailable here) is checked for
closeness against Pillow's independent bicubic.
"""

import io

import numpy as np
import pytest
import torch
from media_oracle import reference_image, reference_size
from PIL import Image

from unigemma.errors import InputError
from unigemma.processing.image import (SOFT_TOKEN_BUDGETS, batch_images, load_image, preprocess_image, resize,
                                       target_size, to_tensor)

# (height, width, budget): strips, a single pixel, the 8000x6000 photo, odd and exact sizes.
SIZES = [(1, 1000, 280), (1000, 1, 280), (1, 1, 280), (1, 1, 70), (6000, 8000, 280), (8000, 6000, 1120),
         (480, 640, 280), (640, 480, 70), (1080, 1920, 140), (1920, 1080, 560), (224, 224, 280),
         (17, 333, 1120), (333, 17, 140), (2, 3, 70), (48, 48, 70), (768, 768, 280), (100, 4000, 560),
         (4000, 100, 70), (31, 31, 1120), (719, 1279, 280), (3, 2000, 1120), (50, 50, 560), (999, 1001, 140)]


def picture(h, w, seed=0):
    """A smooth image with some noise, cheap to make at 48 MP."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    base = np.stack(np.broadcast_arrays(y + 0 * x, x + 0 * y, (x + y) / 2), -1)
    if h * w <= 4_000_000:
        base = base + rng.normal(0, 8, base.shape).astype(np.float32)
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("h,w,budget", SIZES)
def test_patches_equal_reference_helpers(h, w, budget):
    u8 = torch.from_numpy(picture(h, w)).permute(2, 0, 1).contiguous()
    assert target_size(h, w, budget) == reference_size(h, w, budget)
    got = preprocess_image(u8, max_soft_tokens=budget)
    pv, pos, n = reference_image(resize(u8, *got.size), budget)
    assert got.num_soft_tokens == n <= budget
    assert torch.equal(got.pixel_values, pv) and got.pixel_values.dtype == torch.float32
    assert torch.equal(got.position_ids, pos) and got.position_ids.dtype == torch.int64
    assert (got.position_ids[n:] == -1).all() and (got.pixel_values[n:] == 0).all()


def test_resize_is_close_to_pillow_bicubic():
    """Pillow's bicubic (a = -0.5, its own antialias) vs torch's (a = -0.75): same shape of kernel,
    so on a smooth noisy picture the two agree to well under one level on average."""
    a = picture(480, 640, seed=1)
    for h, w in [(336, 480), (768, 1008), (96, 96), (48, 2016)]:
        ours = resize(to_tensor(Image.fromarray(a)), h, w).permute(1, 2, 0).numpy().astype(int)
        pil = np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC)).astype(int)
        d = np.abs(ours - pil)
        assert d.mean() < 0.5 and np.percentile(d, 99) <= 2, (h, w, d.mean())
    same = to_tensor(Image.fromarray(a[:480, :624]))
    assert resize(same, 480, 624) is same  # no resize when the size already fits, as the reference


def test_budgets_and_batch():
    img = Image.fromarray(picture(300, 200))
    counts = [preprocess_image(img, b).num_soft_tokens for b in SOFT_TOKEN_BUDGETS]
    assert counts == sorted(counts) and all(c <= b for c, b in zip(counts, SOFT_TOKEN_BUDGETS))
    pv, pos = batch_images([preprocess_image(img), preprocess_image(Image.fromarray(picture(50, 900)))])
    assert pv.shape == (2, 280, 6912) and pos.shape == (2, 280, 2)
    with pytest.raises(InputError, match="one of"):
        preprocess_image(img, 300)
    with pytest.raises(InputError, match="share"):
        batch_images([preprocess_image(img, 70), preprocess_image(img, 280)])


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    img = Image.fromarray(picture(40, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = load_image(encoded(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (40, 60) and out.mode == "RGB"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats(fmt, tmp_path):
    img = Image.fromarray(picture(30, 50))
    data = encoded(img, fmt)
    (tmp_path / "x").write_bytes(data)
    for source in (data, tmp_path / "x", str(tmp_path / "x"), io.BytesIO(data)):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (50, 30)
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless
        assert np.array_equal(np.asarray(load_image(data)), np.asarray(img))
    import base64
    assert load_image("data:image/png;base64," + base64.b64encode(data).decode()).size == (50, 30)


def test_modes_become_rgb():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: white after compositing
    rgba[0, 0] = (10, 20, 30, 255)
    out = np.asarray(load_image(encoded(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert (out[1:, 1:] == 255).all() and tuple(out[0, 0]) == (10, 20, 30)
    la = Image.fromarray(np.stack([np.full((3, 3), 40, np.uint8), np.full((3, 3), 255, np.uint8)], -1), "LA")
    assert tuple(np.asarray(load_image(encoded(la, "PNG")))[0, 0]) == (40, 40, 40)
    pal = Image.fromarray(picture(8, 8)).convert("P")
    pal.info["transparency"] = 0
    assert load_image(encoded(pal, "PNG", transparency=0)).mode == "RGB"
    cmyk = Image.new("CMYK", (5, 5), (0, 255, 255, 0))  # pure red in CMYK
    red = np.asarray(load_image(encoded(cmyk, "JPEG", quality=100)))[2, 2].astype(int)
    assert np.abs(red - (255, 0, 0)).max() <= 3
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))  # 16-bit white
    assert deep.mode.startswith("I")
    assert (np.asarray(load_image(encoded(deep, "PNG"))) == 255).all()
    half = Image.fromarray(np.full((4, 4), 32896, np.uint16))
    assert (np.asarray(load_image(encoded(half, "PNG"))) == 128).all()  # scaled, not clipped at 255
    assert (np.asarray(load_image(encoded(Image.new("1", (4, 4), 1), "PNG"))) == 255).all()
    assert np.asarray(load_image(Image.new("L", (2, 2), 7))).tolist() == [[[7] * 3] * 2] * 2
    assert load_image(np.zeros((5, 6), np.uint8)).size == (6, 5)
    assert load_image(np.ones((5, 6, 3), np.float32)).getpixel((0, 0)) == (255, 255, 255)


def test_bad_images_raise_input_error(tmp_path):
    good = encoded(Image.fromarray(picture(64, 64)), "JPEG")
    bomb = encoded(Image.new("1", (20000, 20000)), "PNG")  # 400 MP in a few tens of KB: Pillow's own guard
    big = encoded(Image.new("1", (11000, 10000)), "PNG")  # 110 MP: ours, from the header, before decoding
    cases = [
        (b"", "empty"), (b"\x00garbage" * 50, "not an image format"), (good[: len(good) // 2], "truncated"),
        (bomb, "over the limit"), (big, "over the limit of 100,000,000"), (tmp_path / "missing.png", "does not exist"), (tmp_path, "not a file"),
        ("https://example.invalid/cat.png", "not fetched"), ("data:image/png;base64,@@@", "invalid base64"),
        (12345, "cannot read an image"), (np.zeros((2, 2, 5), np.uint8), "must be"),
        (np.full((2, 2), 3.0), "uint8, or float"),
    ]
    for source, match in cases:
        with pytest.raises(InputError, match=match):
            load_image(source)
    with pytest.raises(InputError, match="over the limit"):
        load_image(Image.new("L", (100, 100)), max_pixels=9999)
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(InputError, match="not an image format"):
        load_image(tmp_path / "a.txt")
