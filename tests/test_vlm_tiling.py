"""Dynamic high-resolution tiling (zoo.vlm.tiling) on real photos, against rules re-derived here from the papers'
descriptions (4KHD's HD_transform, LLaVA-NeXT's select_best_resolution) and per-view tower outputs."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import zoo  # noqa: F401
from zoo.vlm import DynamicTiler, TiledEncoder, TileSeparators, ZooVisionTower, tiled_token_count

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the real sample photos")


def photos():
    """Several aspect ratios: square, 3:2 wide, 3:2 tall, ~1.5 wide, very wide strip, very tall strip."""
    coffee = skimage_data.coffee()
    astronaut = skimage_data.astronaut()
    return [astronaut, coffee, coffee.transpose(1, 0, 2).copy(), skimage_data.chelsea(), astronaut[:90],
            astronaut[:, :70].copy()]


def oracle_4khd(width, height, tile, hd_num):
    """HD_transform, written from its description: long side as width, largest s with s*ceil(s/aspect) <= hd_num."""
    portrait = height > width
    w, h = (height, width) if portrait else (width, height)
    ratio = w / h
    cols = max(s for s in range(1, hd_num + 1) if s * math.ceil(s / ratio) <= hd_num)
    new_w, new_h = cols * tile, int(cols * tile / ratio)
    rows = math.ceil(new_h / tile)
    return ((cols, rows), (new_h, new_w)) if portrait else ((rows, cols), (new_w, new_h))


def oracle_anyres(width, height, pinpoints):
    """select_best_resolution: most effective pixels after an aspect-keeping downscale, then least waste."""
    def key(p):
        s = min(p[0] / width, p[1] / height)
        eff = min(int(width * s) * int(height * s), width * height)
        return eff, -(p[0] * p[1] - eff)
    return max(pinpoints, key=key)  # first maximum, as a strict '>' scan keeps


@pytest.fixture(scope="module")
def vit_tower():
    torch.manual_seed(0)
    return ZooVisionTower("test_vit", image_size=64)


def test_4khd_grids_and_white_padding_on_real_photos(vit_tower):
    tile, hd_num = vit_tower.config.image_size, 6
    tiler = DynamicTiler(vit_tower.image_processor, "4khd", hd_num=hd_num)
    seen = set()
    for arr in photos():
        img = Image.fromarray(arr).convert("RGB")
        (rows, cols), (new_w, new_h) = oracle_4khd(img.width, img.height, tile, hd_num)
        tiled = tiler(arr)
        assert tiled.grid == (rows, cols)
        assert tiled.pixel_values.shape == (1 + rows * cols, 3, tile, tile)
        seen.add((rows, cols))
        # the tiles are the resized image padded white, centred, cut row-major (torchvision builds the canvas)
        resized = TF.resize(img, [new_h, new_w], InterpolationMode.BICUBIC)
        left, top = (cols * tile - new_w) // 2, (rows * tile - new_h) // 2
        canvas = TF.pad(resized, [left, top, cols * tile - new_w - left, rows * tile - new_h - top], fill=255)
        for r in range(rows):
            for c in range(cols):
                expected = vit_tower.image_processor.normalise(canvas.crop((c * tile, r * tile, (c + 1) * tile,
                                                                             (r + 1) * tile)))
                torch.testing.assert_close(tiled.pixel_values[1 + r * cols + c], expected, rtol=0, atol=1e-6)
        expected_global = vit_tower.image_processor.normalise(TF.resize(img, [tile, tile], InterpolationMode.BICUBIC))
        torch.testing.assert_close(tiled.pixel_values[0], expected_global, rtol=0, atol=1e-6)
    assert len(seen) >= 3  # the photos really give different grids
    # the paper's setting: 336 px tiles, hd_num 25; a 600x400 photo -> 4 rows x 6 columns
    assert oracle_4khd(600, 400, 336, 25)[0] == (4, 6) and DynamicTiler(
        type(vit_tower.image_processor)(336, (0.5,) * 3, (0.5,) * 3), hd_num=25).grid_for(600, 400)[:2] == (4, 6)


def test_anyres_grid_pinpoints_on_real_photos(vit_tower):
    t = vit_tower.config.image_size
    pinpoints = [(2 * t, t), (t, 2 * t), (2 * t, 2 * t), (3 * t, t), (t, 3 * t)]
    tiler = DynamicTiler(vit_tower.image_processor, "anyres", grid_pinpoints=pinpoints)
    grids = set()
    for arr in photos():
        h, w = arr.shape[:2]
        pw, ph = oracle_anyres(w, h, pinpoints)
        tiled = tiler(arr)
        assert tiled.grid == (ph // t, pw // t)
        grids.add(tiled.grid)
    assert len(grids) >= 3


def naive_merge(grid_tokens):
    """(h, w, C) -> (h/2, w/2, 4C): channel 4c + 2i + j holds channel c of the neighbour at offset (i, j)."""
    h, w, c = grid_tokens.shape
    out = torch.empty(h // 2, w // 2, 4 * c, dtype=grid_tokens.dtype)
    for r in range(h // 2):
        for q in range(w // 2):
            for ch in range(c):
                for i in range(2):
                    for j in range(2):
                        out[r, q, 4 * ch + 2 * i + j] = grid_tokens[2 * r + i, 2 * q + j, ch]
    return out


def tile_size_for(name):
    red = timm.create_model(name, num_classes=0).feature_info[-1]["reduction"]
    return 4 * red if name in ("test_vit", "test_vim") else 2 * red  # even grids: 4x4 / 2x2


@pytest.mark.parametrize("name", ["test_vit", "test_vim", "test_convllava", "test_msvmamba"])
def test_tiled_tokens_counts_and_layout_match_per_view_outputs(name):
    if not timm.is_model(name):
        pytest.skip(f"{name} is not registered")
    torch.manual_seed(0)
    tower = ZooVisionTower(name, image_size=tile_size_for(name))
    grid = tower.config.grid
    seps = TileSeparators(4 * tower.hidden_size)
    encoder = TiledEncoder(tower, merge=True, separators=seps)
    tiler = DynamicTiler(tower.image_processor, "4khd", hd_num=4)
    images = [tiler(p) for p in photos()[1:3]]  # wide and tall
    calls = []
    stem = next(m for m in tower.vision_tower.modules() if isinstance(m, torch.nn.Conv2d))  # patch embed / stem
    hook = stem.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        out = encoder(images)
    finally:
        hook.remove()
    assert calls == [sum(im.pixel_values.shape[0] for im in images)]  # every view of every image: one pass
    mh, mw = grid[0] // 2, grid[1] // 2
    for im, tokens, layout, count, (rows, cols) in zip(images, out.tokens, out.layout, out.counts, out.grids):
        assert (rows, cols) == im.grid
        assert count == tokens.shape[0] == (rows * cols + 1) * mh * mw + 1 + (rows + 1) * mh  # the formula
        assert count == tiled_token_count((rows, cols), grid)
        per_view = tower(im.pixel_values)  # oracle: each view through the plain tower
        merged = [naive_merge(v.reshape(grid[0], grid[1], -1)) for v in per_view]
        sep = layout["separator"]
        assert int((sep == 2).sum()) == 1 and int((sep == 1).sum()) == (rows + 1) * mh
        view_sep = int((sep == 2).nonzero())
        assert view_sep == mh * (mw + 1)  # [global rows + separators, view separator, local]
        for k in range(count):
            tile, r, c = (int(layout[key][k]) for key in ("tile", "row", "col"))
            if sep[k] == 1:
                assert c == (mw if k < view_sep else cols * mw)
                torch.testing.assert_close(tokens[k], seps.row.detach())
            elif sep[k] == 2:
                torch.testing.assert_close(tokens[k], seps.view.detach())
            elif tile == 0:
                torch.testing.assert_close(tokens[k], merged[0][r, c], rtol=1e-4, atol=1e-5)
            else:
                tr, tc = divmod(tile - 1, cols)
                assert (r // mh, c // mw) == (tr, tc)
                torch.testing.assert_close(tokens[k], merged[tile][r - tr * mh, c - tc * mw], rtol=1e-4, atol=1e-5)


def test_4khd_token_count_at_336px_vit_l14_without_running_it():
    tower = ZooVisionTower("vit_large_patch14_clip_336", image_size=336, delay_load=True)  # meta build
    assert tower.config.grid == (24, 24)
    for h, w in [(1, 1), (4, 6), (5, 5), (2, 7)]:
        assert tiled_token_count((h, w), tower.config.grid) == (h * w + 1) * 144 + 1 + (h + 1) * 12


def test_separator_parameters_receive_gradients(vit_tower):
    seps = TileSeparators(4 * vit_tower.hidden_size)
    encoder = TiledEncoder(vit_tower, separators=seps)
    out = encoder([DynamicTiler(vit_tower.image_processor, hd_num=4)(skimage_data.coffee())])
    weights = torch.randn(out.tokens[0].shape)
    (out.tokens[0] * weights).sum().backward()
    rows = out.layout[0]["separator"] == 1
    torch.testing.assert_close(seps.row.grad, weights[rows].sum(0))
    torch.testing.assert_close(seps.view.grad, weights[out.layout[0]["separator"] == 2].sum(0))


def test_tiling_errors_are_clear(vit_tower):
    with pytest.raises(ValueError, match="unknown tiling rule"):
        DynamicTiler(vit_tower.image_processor, "grid")
    with pytest.raises(ValueError, match="needs grid_pinpoints"):
        DynamicTiler(vit_tower.image_processor, "anyres")
    with pytest.raises(ValueError, match="not a multiple of the tile"):
        DynamicTiler(vit_tower.image_processor, "anyres", grid_pinpoints=[(100, 64)])(skimage_data.coffee())
    with pytest.raises(ValueError, match="without keep_tokens"):
        TiledEncoder(ZooVisionTower("test_vit", image_size=64, keep_tokens=4))
    with pytest.raises(ValueError, match="even token grid"):
        TiledEncoder(ZooVisionTower("test_vit", image_size=48))([DynamicTiler(
            ZooVisionTower("test_vit", image_size=48).image_processor, hd_num=2)(skimage_data.coffee())])
    with pytest.raises(ValueError, match="separators have width"):
        TiledEncoder(vit_tower, separators=TileSeparators(vit_tower.hidden_size))
