"""Image loading, the HD transform and the token layout, checked against the official
Phi-3.5-V processor's arithmetic (re-implemented here independently)."""

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from hae_cli.cache.modality import Modality
from hae_cli.errors import CheckpointError, ConfigError, InputError
from hae_cli.model.phi3v.image import (
    ImageProcessorConfig,
    crop_grid,
    hd_transform,
    image_token_modalities,
    preprocess,
    tokens_per_image,
)
from hae_cli.model.image_file import load_image

OFFICIAL_MEAN = [0.48145466, 0.4578275, 0.40821073]
OFFICIAL_STD = [0.26862954, 0.26130258, 0.27577711]



def noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def reference_hd_transform(img, hd_num, crop=336):
    """A line-by-line transcription of the official `HD_transform` + `padding_336`
    (torchvision's PIL resize is PIL's bilinear resize)."""
    width, height = img.size
    trans = False
    if width < height:
        img = img.transpose(Image.TRANSPOSE)
        trans = True
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * crop)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    arr = np.asarray(img)
    tar = int(np.ceil(new_h / crop) * crop)
    top = int((tar - new_h) / 2)
    out = np.full((tar, new_w, 3), 255, dtype=np.uint8)
    out[top : top + new_h] = arr
    img = Image.fromarray(out, "RGB")
    if trans:
        img = img.transpose(Image.TRANSPOSE)
    return img


# ----------------------------------------------------------------- sizes and token counts

SIZES = (
    [(1, 1), (2, 2), (14, 14), (335, 335), (336, 336), (337, 337), (672, 672), (1000, 1000)]
    + [(1, 2), (2, 1), (1, 7), (7, 1), (3, 5), (5, 3)]  # tiny
    + [(5000, 300), (300, 5000), (4000, 50), (50, 4000), (2000, 1), (1, 2000)]  # huge strips
    + [(640, 480), (480, 640), (1024, 768), (768, 1024), (1920, 1080), (1080, 1920)]
    + [(800, 200), (200, 800), (1000, 333), (333, 1000), (1001, 500), (500, 1001)]
    + [(337, 336), (336, 337), (673, 336), (336, 673), (1009, 335), (335, 1009)]
    + [(100, 99), (99, 100), (512, 256), (256, 512), (1500, 400), (400, 1500)]
    + [(123, 457), (457, 123), (999, 998), (60, 1300), (1300, 60), (2500, 2400), (31, 29)]
)


OFFICIAL_SUBSET = [(1, 1), (337, 337), (5000, 300), (300, 5000), (1000, 333), (2000, 1)]


def test_enough_sizes():
    assert len(set(SIZES)) >= 50


def check_sizes(sizes, num_crops, config, run_preprocess=True):
    """The transform's size, the arithmetic grid, the pixel tensor and the token layout must
    all agree, for every size."""
    crop, grid = config.crop_size, config.merged_grid
    for width, height in sizes:
        image = Image.new("RGB", (width, height), (10, 200, 30))
        transformed = hd_transform(image, num_crops, crop)
        tw, th = transformed.size
        assert tw % crop == 0 and th % crop == 0, (width, height, num_crops, transformed.size)
        h, w = crop_grid(width, height, num_crops, crop)
        assert (th // crop, tw // crop) == (h, w)
        assert 1 <= h * w <= num_crops
        # The grid is as large as allowed: one more crop along the long side would overflow.
        long_side, short_side = (w, h) if width >= height else (h, w)
        ratio = max(width, height) / min(width, height)
        assert (long_side + 1) * math.ceil((long_side + 1) / ratio) > num_crops
        assert short_side == max(1, math.ceil(int(long_side * crop / ratio) / crop))

        features = (h * w + 1) * grid * grid  # every crop and the global view
        separators = h * grid + 1 + grid  # a sub_GN per feature row, one glb_GN
        assert tokens_per_image(h, w, grid) == features + separators
        tags = image_token_modalities(h, w, grid)
        assert int((tags == Modality.IMAGE).sum()) == features
        assert int((tags == Modality.SEPARATOR).sum()) == separators
        if run_preprocess:
            processed = preprocess(image, config)
            assert processed.pixel_values.shape == (1 + h * w, 3, crop, crop)
            assert (processed.h_crops, processed.w_crops) == (h, w)
            assert processed.num_tokens == tokens_per_image(h, w, grid) == len(processed.modalities)
            assert torch.equal(processed.modalities, tags)


@pytest.mark.parametrize("num_crops", [1, 4, 16])
def test_token_count_matches_formula_over_many_sizes(num_crops):
    # Pixels are costly on a shared CPU: preprocess every size at a small crop (same code path),
    # and at the official 336/14 for a spread of sizes; the geometry runs at 336 for all.
    check_sizes(SIZES, num_crops, ImageProcessorConfig(num_crops=num_crops), run_preprocess=False)
    small = ImageProcessorConfig(num_crops=num_crops, crop_size=56, patch_size=14)
    check_sizes(SIZES, num_crops, small)
    check_sizes(OFFICIAL_SUBSET, num_crops, ImageProcessorConfig(num_crops=num_crops))


def test_known_token_counts_and_official_config():
    assert tokens_per_image(1, 1) == 313
    assert tokens_per_image(2, 2) == 757
    assert tokens_per_image(4, 4) == 2509  # a square image with num_crops=16
    config = ImageProcessorConfig()
    assert (config.num_crops, config.crop_size, config.patch_size) == (4, 336, 14)
    assert config.merged_grid == 12
    assert list(config.image_mean) == OFFICIAL_MEAN and list(config.image_std) == OFFICIAL_STD
    assert crop_grid(336, 336, 1, 336) == (1, 1)
    assert crop_grid(336, 336, 4, 336) == (2, 2)  # scale 2: 2*ceil(2/1) = 4 crops fit
    assert crop_grid(2000, 500, 4, 336) == (1, 4)
    assert crop_grid(1344, 1000, 4, 336) == (2, 2)  # 672 wide -> 500 high -> 2 rows
    assert crop_grid(1000, 100, 4, 336) == (1, 4)
    assert crop_grid(1000, 1000, 16, 336) == (4, 4)
    assert crop_grid(5000, 300, 16, 336) == (1, 16)
    assert crop_grid(300, 5000, 16, 336) == (16, 1)


@pytest.mark.parametrize(
    "size,num_crops",
    [((500, 300), 4), ((300, 500), 4), ((1000, 100), 16),
     ((50, 50), 4), ((7, 900), 16), ((1280, 720), 16)],
)
def test_hd_transform_pixel_equal_to_reference(size, num_crops):
    image = noise(*size, seed=size[0])
    ours = hd_transform(image, num_crops, 336)
    ref = reference_hd_transform(image, num_crops)
    assert ours.size == ref.size and ours.mode == "RGB"
    assert np.array_equal(np.asarray(ours), np.asarray(ref))


@settings(max_examples=150, deadline=None)
@given(
    width=st.integers(1, 400),
    height=st.integers(1, 400),
    num_crops=st.integers(1, 20),
    crop=st.integers(4, 48),
)
def test_crop_grid_predicts_the_transform(width, height, num_crops, crop):
    transformed = hd_transform(Image.new("RGB", (width, height)), num_crops, crop)
    expected = (transformed.height // crop, transformed.width // crop)
    assert crop_grid(width, height, num_crops, crop) == expected
    assert transformed.width % crop == 0 and transformed.height % crop == 0


def test_padding_is_white_and_centred():
    image = Image.new("RGB", (672, 100), (0, 0, 0))  # 2 crops wide, pad 100 -> 336 rows
    out = np.asarray(hd_transform(image, 2, 336))
    assert out.shape == (336, 672, 3)
    top = (336 - 100) // 2
    assert (out[:top] == 255).all() and (out[top + 100 :] == 255).all()
    assert (out[top : top + 100] == 0).all()


# ----------------------------------------------------------------- token layout


def test_separator_positions_2x3():
    h, w, grid = 2, 3, 12
    tags = image_token_modalities(h, w, grid)
    assert tags.dtype == torch.int8 and len(tags) == tokens_per_image(h, w, grid) == 1045
    row = w * grid + 1  # 36 features + sub_GN
    sub_seps = [row * r + w * grid for r in range(h * grid)]
    glb_gn = row * h * grid  # 888
    glb_seps = [glb_gn + 1 + 13 * r + 12 for r in range(grid)]
    expected = sub_seps + [glb_gn] + glb_seps
    assert expected[:2] == [36, 73] and glb_gn == 888 and expected[-1] == 1044
    assert torch.nonzero(tags == Modality.SEPARATOR).flatten().tolist() == expected
    assert int((tags == Modality.IMAGE).sum()) == 1045 - 37
    assert set(tags.tolist()) == {Modality.IMAGE, Modality.SEPARATOR}


def test_layout_small_grid_literal():
    letters = {Modality.IMAGE: "I", Modality.SEPARATOR: "S"}
    tags = "".join(letters[Modality(t)] for t in image_token_modalities(1, 2, 2).tolist())
    # sub: 2 rows of (2 crops x 2) features + sub_GN | glb_GN | global: 2 rows of 2 + sub_GN
    assert tags == "IIIIS" "IIIIS" "S" "IIS" "IIS"


# ----------------------------------------------------------------- pixel values


def test_pixel_values_global_view_then_crops_row_major():
    config = ImageProcessorConfig(num_crops=6, crop_size=28, patch_size=14)
    image = noise(84, 56, seed=3)  # 3x2 crops exactly, no resize needed
    processed = preprocess(image, config)
    assert (processed.h_crops, processed.w_crops) == (2, 3)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(OFFICIAL_MEAN).view(3, 1, 1)) / torch.tensor(OFFICIAL_STD).view(3, 1, 1)
    pv = processed.pixel_values
    assert pv.dtype == torch.float32
    expected_global = F.interpolate(x[None], size=(28, 28), mode="bicubic", align_corners=False)[0]
    assert torch.allclose(pv[0], expected_global, atol=1e-5)
    for r in range(2):
        for c in range(3):
            crop = x[:, r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28]
            assert torch.allclose(pv[1 + r * 3 + c], crop, atol=1e-6), (r, c)


def test_padding_is_normalised_white():
    config = ImageProcessorConfig(
        num_crops=1, crop_size=28, patch_size=14,
        image_mean=(0.5, 0.25, 0.0), image_std=(0.5, 0.25, 2.0),
    )
    processed = preprocess(Image.new("RGB", (28, 4), (0, 0, 0)), config)
    corner = processed.pixel_values[1, :, 0, 0]  # top row is padding
    assert torch.allclose(corner, torch.tensor([1.0, 3.0, 0.5]))
    centre = processed.pixel_values[1, :, 14, 0]  # black content
    assert torch.allclose(centre, torch.tensor([-1.0, -1.0, 0.0]))


# ----------------------------------------------------------------- config


def test_config_validation():
    for bad in [dict(num_crops=0), dict(crop_size=30), dict(crop_size=42), dict(patch_size=0),
                dict(image_std=(0.1, 0.0, 0.1)), dict(image_mean=(0.1, 0.2)), dict(num_crops=2.5)]:
        with pytest.raises(ConfigError):
            ImageProcessorConfig(**bad)


def test_config_from_files(tmp_path):
    data = {"num_crops": 16, "num_img_tokens": 144, "image_mean": [0.5] * 3, "image_std": [0.2] * 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(data))
    config = ImageProcessorConfig.from_files(tmp_path, crop_size=336, patch_size=14)
    assert config.num_crops == 16
    assert config.image_mean == (0.5, 0.5, 0.5) and config.image_std == (0.2, 0.2, 0.2)
    assert ImageProcessorConfig.from_files(tmp_path, 336, 14, num_crops=2).num_crops == 2
    with pytest.raises(ConfigError):
        ImageProcessorConfig.from_files(tmp_path, 336, 14, num_crops=0)
    with pytest.raises(CheckpointError, match="num_img_tokens"):
        ImageProcessorConfig.from_files(tmp_path, 28, 14)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"num_crops": 0}))
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        ImageProcessorConfig.from_files(tmp_path, 336, 14)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        ImageProcessorConfig.from_files(tmp_path, 336, 14)
    with pytest.raises(CheckpointError, match="missing"):
        ImageProcessorConfig.from_files(tmp_path / "nowhere", 336, 14)


# ----------------------------------------------------------------- load_image


def _encoded(fmt, size=(64, 48), **kw):
    buffer = io.BytesIO()
    noise(*size).save(buffer, fmt, **kw)
    return buffer.getvalue()


def _bad_inputs(tmp_path):
    png, jpeg = _encoded("PNG"), _encoded("JPEG", quality=90)
    corrupt = bytearray(png)
    corrupt[len(png) // 2 : len(png) // 2 + 64] = bytes(64)  # zeroed bytes inside IDAT
    files = {
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.png": bytes(corrupt),
        "notes.png": b"this is a text file, not a picture\n",
        "empty.png": b"",
        "header_only.png": png[:40],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.png").mkdir()
    return [tmp_path / n for n in files] + [tmp_path / "folder.png", tmp_path / "missing.png"]


def test_load_image_bad_inputs_raise_input_error(tmp_path):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    for path in _bad_inputs(tmp_path):
        with pytest.raises(InputError) as info:
            load_image(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, message
    assert "image not found" in _message(tmp_path / "missing.png")
    assert "directory" in _message(tmp_path / "folder.png")
    assert "empty" in _message(tmp_path / "empty.png")
    assert "truncated or corrupt" in _message(tmp_path / "truncated.jpg")
    with pytest.raises(InputError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def _message(path):
    with pytest.raises(InputError) as info:
        load_image(str(path))
    return str(info.value)


def _modes():
    size = (40, 30)
    p = Image.new("P", size, 1)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p_trans = p.copy()
    p_trans.info["transparency"] = 1  # index 1 (blue) is transparent -> white
    rgba = Image.new("RGBA", size, (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 255))
    la = Image.new("LA", size, (0, 128))  # half-transparent black
    i16 = Image.new("I;16", size, 257 * 100)
    i32 = Image.new("I", size, 65535)
    return {
        "cmyk.tif": (Image.new("CMYK", size, (0, 255, 255, 0)), (255, 0, 0)),
        "p.png": (p, (0, 0, 255)),
        "p_trans.png": (p_trans, (255, 255, 255)),
        "la.png": (la, (127, 127, 127)),
        "rgba.png": (rgba, (255, 255, 255)),
        "i16.png": (i16, (100, 100, 100)),
        "i32.tif": (i32, (255, 255, 255)),
        "one.png": (Image.new("1", size, 1), (255, 255, 255)),
        "l.jpg": (Image.new("L", size, 200), (200, 200, 200)),
    }


def test_load_image_converts_modes_to_rgb(tmp_path):
    for name, (image, pixel) in _modes().items():
        path = tmp_path / name
        image.save(path)
        for source in (path, image):
            loaded = load_image(source)
            assert loaded.mode == "RGB" and loaded.size == (40, 30), name
            got = loaded.getpixel((5, 5))
            assert all(abs(a - b) <= 2 for a, b in zip(got, pixel)), (name, source, got, pixel)
    # The one opaque RGBA pixel stays black.
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (0, 0, 0)


def test_load_image_refuses_frames_and_releases_the_file(tmp_path):
    """An animation is refused (which frame is meant is not for hae to guess, issue 27); a
    picture is fully decoded, so the file can go at once."""
    frames = [Image.new("RGB", (20, 10), c) for c in [(255, 0, 0), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match="2 frames"):
        load_image(path)
    frames[0].save(path)
    loaded = load_image(path)
    path.unlink()  # fully decoded: no lazy reads from the file afterwards
    assert loaded.size == (20, 10) and loaded.getpixel((3, 3)) == (255, 0, 0)
