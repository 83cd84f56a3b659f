"""Dynamic high-resolution tiling for any zoo tower (InternLM-XComposer2-4KHD and LLaVA-NeXT "anyres").

One image of any size and aspect becomes a global view plus a ``rows x cols`` grid of tiles, all at the tower's
``image_size``. ``TiledEncoder`` encodes every view of every image in one batched pass, keeps each tile's token
grid, optionally merges 2 x 2 neighbours (pixel-unshuffle of the token map: 4x the width, a quarter of the
tokens), stitches the tiles back into one map and inserts separator embeddings from a small learnable module:
one at the end of every token row and one between the global and the local view (4KHD's layout
``[global, global_separator, local]``). It returns the tokens of each image, their count and a layout record
saying where every token came from.

Grid rules:

* ``'4khd'`` (``HD_transform``): with the long side taken as the width (portraits are transposed first),
  ``cols`` is the largest ``s`` with ``s * ceil(s / aspect) <= hd_num``; the image is resized to width
  ``cols * tile`` (height in proportion) and padded with white, centred, to a multiple of ``tile`` in height.
* ``'anyres'`` (LLaVA-NeXT ``select_best_resolution``): from ``grid_pinpoints`` (multiples of the tile) the
  resolution that keeps the most of the image's pixels after an aspect-preserving downscale, ties broken by the
  least padding; the image is resized to fit it and padded with black, centred.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .processor import ImageLike, ImageProcessor, _RESAMPLE
from .tower import ZooVisionTower

__all__ = ["TILING_RULES", "hd_transform_grid", "anyres_grid", "DynamicTiler", "TiledImage", "TileSeparators",
           "TiledEncoder", "TiledFeatures", "tiled_token_count", "merge_2x2"]

TILING_RULES = ("4khd", "anyres")
SEP_NONE, SEP_ROW, SEP_VIEW = 0, 1, 2  # layout["separator"] values


def hd_transform_grid(width: int, height: int, tile: int, hd_num: int = 25) -> Tuple[int, int, Tuple[int, int]]:
    """4KHD's ``(rows, cols, (resized_w, resized_h))`` for a ``width x height`` image (padding not included)."""
    if width < 1 or height < 1:
        raise ValueError(f"empty image: {width}x{height}")
    if hd_num < 1:
        raise ValueError(f"hd_num must be >= 1, got {hd_num}")
    portrait = width < height
    long_side, short_side = (height, width) if portrait else (width, height)
    aspect = long_side / short_side
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / aspect) <= hd_num:
        scale += 1
    new_long = scale * tile
    new_short = max(1, int(new_long / aspect))
    across = math.ceil(new_short / tile)
    if portrait:
        return scale, across, (new_short, new_long)
    return across, scale, (new_long, new_short)


def anyres_grid(width: int, height: int, tile: int,
                grid_pinpoints: Sequence[Tuple[int, int]]) -> Tuple[int, int, Tuple[int, int]]:
    """LLaVA-NeXT's ``(rows, cols, (resized_w, resized_h))``: the pinpoint (width, height) that keeps most pixels."""
    if width < 1 or height < 1:
        raise ValueError(f"empty image: {width}x{height}")
    if not grid_pinpoints:
        raise ValueError("grid_pinpoints is empty; give (width, height) resolutions that are multiples of the tile")
    best, best_key = None, None
    for pw, ph in grid_pinpoints:
        if pw % tile or ph % tile:
            raise ValueError(f"grid pinpoint {pw}x{ph} is not a multiple of the tile size {tile}")
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(pw * ph - effective))
        if best_key is None or key > best_key:
            best, best_key = (pw, ph), key
    pw, ph = best
    if pw / width < ph / height:
        new_w, new_h = pw, min(math.ceil(height * pw / width), ph)
    else:
        new_w, new_h = min(math.ceil(width * ph / height), pw), ph
    return ph // tile, pw // tile, (new_w, new_h)


@dataclass
class TiledImage:
    """One image's views: ``pixel_values`` (1 + rows * cols, 3, tile, tile), global view first, tiles row-major."""

    pixel_values: torch.Tensor
    grid: Tuple[int, int]  # (rows, cols)


class DynamicTiler:
    """The processor mode for dynamic resolution: image -> ``TiledImage`` (global view + tile batch).

    The tile side is ``processor.image_size`` (the tower's input size); scaling, normalisation and the dtype rules
    are the processor's. The global view is the whole image resized to one tile (as both papers do).
    """

    def __init__(self, processor: ImageProcessor, rule: str = "4khd", hd_num: int = 25,
                 grid_pinpoints: Optional[Sequence[Tuple[int, int]]] = None):
        if rule not in TILING_RULES:
            raise ValueError(f"unknown tiling rule {rule!r}; accepted: {', '.join(TILING_RULES)}")
        if rule == "anyres" and not grid_pinpoints:
            raise ValueError("rule='anyres' needs grid_pinpoints, e.g. [(672, 336), (336, 672), (672, 672)]")
        self.processor, self.rule, self.hd_num = processor, rule, int(hd_num)
        self.grid_pinpoints = [tuple(int(v) for v in p) for p in (grid_pinpoints or [])]
        self.tile = processor.image_size

    def grid_for(self, width: int, height: int) -> Tuple[int, int, Tuple[int, int]]:
        if self.rule == "4khd":
            return hd_transform_grid(width, height, self.tile, self.hd_num)
        return anyres_grid(width, height, self.tile, self.grid_pinpoints)

    def __call__(self, image: ImageLike) -> TiledImage:
        pil = self.processor.to_pil(image)
        rows, cols, (new_w, new_h) = self.grid_for(*pil.size)
        resample = _RESAMPLE[self.processor.interpolation]
        fill = (255, 255, 255) if self.rule == "4khd" else (0, 0, 0)
        canvas = Image.new("RGB", (cols * self.tile, rows * self.tile), fill)
        canvas.paste(pil.resize((new_w, new_h), resample),
                     ((cols * self.tile - new_w) // 2, (rows * self.tile - new_h) // 2))
        views = [pil.resize((self.tile, self.tile), resample)]
        for r in range(rows):
            for c in range(cols):
                t = self.tile
                views.append(canvas.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)))
        return TiledImage(torch.stack([self.processor.normalise(v) for v in views]), (rows, cols))


def merge_2x2(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 4C, H/2, W/2): each 2 x 2 neighbourhood concatenated along channels (pixel-unshuffle:
    output channel ``4 * c + 2 * i + j`` is input channel ``c`` at offset (i, j))."""
    if maps.shape[-1] % 2 or maps.shape[-2] % 2:
        raise ValueError(f"a 2x2 merge needs an even token grid, got {maps.shape[-2]}x{maps.shape[-1]}; "
                         "pick a tile size giving an even grid or merge=False")
    return F.pixel_unshuffle(maps, 2)


class TileSeparators(nn.Module):
    """Learnable separator embeddings (projector side): ``row`` ends every token row, ``view`` sits between the
    global and the local view. ``dim`` is the width of the tokens they are inserted among."""

    def __init__(self, dim: int, init_std: float = 0.02):
        super().__init__()
        self.row = nn.Parameter(torch.randn(dim) * init_std)
        self.view = nn.Parameter(torch.randn(dim) * init_std)


def tiled_token_count(grid: Tuple[int, int], tile_grid: Tuple[int, int], merge: bool = True,
                      separators: bool = True) -> int:
    """Tokens of one tiled image: ``(rows * cols + 1) * m + [1 + (rows + 1) * mh]`` with ``m = mh * mw`` tokens per
    (merged) tile; 4KHD at 336 px / 14 px patches with the 2x2 merge: ``(h*w + 1) * 144 + 1 + (h + 1) * 12``."""
    mh, mw = (tile_grid[0] // 2, tile_grid[1] // 2) if merge else tuple(tile_grid)
    rows, cols = grid
    tokens = (rows * cols + 1) * mh * mw
    return tokens + (1 + (rows + 1) * mh if separators else 0)


@dataclass
class TiledFeatures:
    """Per image: ``tokens[i]`` (T_i, C); ``layout[i]`` a dict of (T_i,) long tensors: ``tile`` (0 global view,
    1.. the tiles row-major, -1 separators), ``row``/``col`` (the token's place in its view's stitched map; a row
    separator has col = the map's width, the view separator row = col = -1) and ``separator`` (0 none, 1 row, 2
    view); ``counts[i]`` = T_i; ``grids[i]`` the (rows, cols) tile grid."""

    tokens: List[torch.Tensor]
    layout: List[Dict[str, torch.Tensor]]
    counts: List[int]
    grids: List[Tuple[int, int]]


class TiledEncoder(nn.Module):
    """Encodes ``TiledImage`` s with a zoo tower: all views of all images in one batched pass.

    ``tower`` must be built at the tile size with no token reduction (the tiles' grids are stitched).
    ``separators``: a ``TileSeparators`` of the output width (4x the tower width with ``merge``), or None to
    insert none.
    """

    def __init__(self, tower: ZooVisionTower, merge: bool = True, separators: Optional[TileSeparators] = None):
        super().__init__()
        if tower.encoder is None:
            raise RuntimeError("the tower is not loaded; call load_model() first")
        if tower.encoder.keep is not None:
            raise ValueError("tiling stitches whole token grids: build the tower without keep_tokens/keep_ratio")
        self.tower, self.merge, self.separators = tower, merge, separators
        width = tower.hidden_size * (4 if merge else 1)
        if separators is not None and separators.row.shape[0] != width:
            raise ValueError(f"separators have width {separators.row.shape[0]}, the tokens {width}")
        self.out_dim = width

    def token_maps(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C', h, w) token maps of N views (merged if configured)."""
        enc = self.tower.encoder
        x = pixel_values.to(device=self.tower.device, dtype=self.tower.dtype)
        with torch.set_grad_enabled(self.tower.options["trainable"] and torch.is_grad_enabled()):
            (feats,), _ = enc.forward_layers(x, [enc.position])
        h, w = feats.grid
        maps = feats.patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return merge_2x2(maps) if self.merge else maps

    def forward(self, images: Sequence[TiledImage]) -> TiledFeatures:
        if not images:
            raise ValueError("no images given")
        maps = self.token_maps(torch.cat([im.pixel_values for im in images]))
        out = TiledFeatures([], [], [], [])
        start = 0
        for im in images:
            rows, cols = im.grid
            n = 1 + rows * cols
            tokens, layout = self._stitch(maps[start:start + n], rows, cols)
            start += n
            out.tokens.append(tokens)
            out.layout.append(layout)
            out.counts.append(tokens.shape[0])
            out.grids.append((rows, cols))
        return out

    def _stitch(self, maps: torch.Tensor, rows: int, cols: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        _, c, h, w = maps.shape
        local = maps[1:].reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
        pieces, records = [], []
        for view, grid_map in ((0, maps[0]), (1, local)):
            tile_of = _tile_index_map(view, rows, cols, h, w)
            toks, rec = self._rows_with_separators(grid_map, tile_of)
            pieces.append(toks)
            records.append(rec)
            if view == 0 and self.separators is not None:
                pieces.append(self.separators.view.to(maps.dtype)[None])
                records.append(_record([-1], [-1], [-1], [SEP_VIEW]))
        layout = {k: torch.cat([r[k] for r in records]) for k in records[0]}
        return torch.cat(pieces), layout

    def _rows_with_separators(self, grid_map: torch.Tensor, tile_of: torch.Tensor):
        c, gh, gw = grid_map.shape
        tokens = grid_map.permute(1, 2, 0)  # (gh, gw, C)
        rr, cc = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        tile, row, col, sep = tile_of, rr, cc, torch.zeros(gh, gw, dtype=torch.long)
        if self.separators is not None:
            tokens = torch.cat([tokens, self.separators.row.to(tokens.dtype).expand(gh, 1, c)], dim=1)
            tile = torch.cat([tile, torch.full((gh, 1), -1)], dim=1)
            row = torch.cat([row, torch.arange(gh)[:, None]], dim=1)
            col = torch.cat([col, torch.full((gh, 1), gw)], dim=1)
            sep = torch.cat([sep, torch.full((gh, 1), SEP_ROW)], dim=1)
        return tokens.reshape(-1, c), _record(tile.flatten(), row.flatten(), col.flatten(), sep.flatten())


def _tile_index_map(view: int, rows: int, cols: int, h: int, w: int) -> torch.Tensor:
    if view == 0:
        return torch.zeros(h, w, dtype=torch.long)
    ids = 1 + torch.arange(rows * cols).reshape(rows, cols)
    return ids.repeat_interleave(h, dim=0).repeat_interleave(w, dim=1)


def _record(tile, row, col, sep) -> Dict[str, torch.Tensor]:
    as_long = lambda v: torch.as_tensor(v, dtype=torch.long)  # noqa: E731
    return dict(tile=as_long(tile), row=as_long(row), col=as_long(col), separator=as_long(sep))
