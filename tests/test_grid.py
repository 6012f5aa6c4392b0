"""wsitile.build_grid: window positions, centre-square labels (against a NumPy reference), tissue filter."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile

import wsitile

CONFIGS = [
    dict(levels=(2, 3), window=80, center=50, stride=80),
    dict(levels=(1, 2), window=299, center=128, stride=128),
    dict(levels=(2,), window=64, center=17, stride=40),
]
CONFIG_IDS = ["l23-w80-c50-s80", "l12-w299-c128-s128", "l2-w64-c17-s40"]


# ---- independent reference ----------------------------------------------------------------------


def read_mask_level0(path) -> np.ndarray:
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0].asarray()
    if page.ndim == 3:
        page = page.max(axis=2)
    return page > 0


def max_pool(mask0: np.ndarray, d: int) -> np.ndarray:
    """Level-Lb tumour pixels: pixel p covers level-0 [p*d, (p+1)*d) (exact downsample d)."""
    h, w = mask0.shape
    assert h % d == 0 and w % d == 0
    return mask0.reshape(h // d, d, w // d, d).max(axis=(1, 3))


def reference_grid(mask0: np.ndarray | None, level_dims, d: int, window: int, center: int, stride: int):
    """(grid_shape, xy, labels) by the issue's rule, computed window by window."""
    width, height = level_dims
    cols = (width - window) // stride + 1
    rows = (height - window) // stride + 1
    xy = np.array([(i * stride, j * stride) for j in range(rows) for i in range(cols)], dtype=np.int64)
    assert (xy[:, 0] + window <= width).all() and (xy[:, 1] + window <= height).all()
    assert ((cols * stride) + window > width) and ((rows * stride) + window > height)  # no window left out
    if mask0 is None:
        return (rows, cols), xy, np.zeros(len(xy), dtype=np.uint8)
    pooled = max_pool(mask0, d)
    assert pooled.shape == (height, width)
    o = (window - center) // 2
    labels = np.array(
        [pooled[y + o : y + o + center, x + o : x + o + center].any() for x, y in xy], dtype=np.uint8
    )
    return (rows, cols), xy, labels


@pytest.fixture(scope="module")
def tumour_mask0(tumour_slide) -> np.ndarray:
    return read_mask_level0(tumour_slide["mask"])


@pytest.fixture(scope="module")
def tslide(tumour_slide) -> wsitile.Slide:
    return wsitile.Slide(tumour_slide["slide"])


def _index_of(xy: np.ndarray, cols: int, stride: int) -> np.ndarray:
    return (xy[:, 1] // stride) * cols + xy[:, 0] // stride


# ---- the grid and label rule --------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_full_grid_matches_reference(tslide, tumour_slide, tumour_mask0, cfg):
    grid = wsitile.build_grid(tslide, tumour_slide["mask"], tissue_threshold=None, **cfg)
    base = cfg["levels"][0]
    d = int(tslide.level_downsamples[base])
    shape, xy, labels = reference_grid(
        tumour_mask0, tslide.level_dimensions[base], d, cfg["window"], cfg["center"], cfg["stride"]
    )
    assert labels.sum() > 0, "the reference has no tumour window: the test would be vacuous"
    assert (labels == 0).sum() > 0
    assert grid.grid_shape == shape
    assert len(grid) == shape[0] * shape[1]
    assert grid.xy.dtype == np.int64 and grid.coords.dtype == np.int64 and grid.labels.dtype == np.uint8
    np.testing.assert_array_equal(grid.xy, xy)
    np.testing.assert_array_equal(grid.coords, np.rint(xy * tslide.level_downsamples[base]).astype(np.int64))
    np.testing.assert_array_equal(grid.coords, xy * d)
    np.testing.assert_array_equal(grid.labels, labels)
    assert grid.levels == tuple(cfg["levels"])
    assert (grid.window, grid.center, grid.stride) == (cfg["window"], cfg["center"], cfg["stride"])
    assert grid.downsamples == tuple(float(2**lvl) for lvl in cfg["levels"])
    assert grid.slide == str(tumour_slide["slide"])


def test_grid_order_rows_by_y_then_x(tslide):
    grid = wsitile.build_grid(tslide, None, tissue_threshold=None)
    keys = grid.xy[:, 1] * 10**9 + grid.xy[:, 0]
    assert (np.diff(keys) > 0).all()
    filtered = wsitile.build_grid(tslide, None)
    keys = filtered.xy[:, 1] * 10**9 + filtered.xy[:, 0]
    assert (np.diff(keys) > 0).all()
    assert (filtered.labels == 0).all() and (grid.labels == 0).all()  # no mask: all normal


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("tissue_threshold", [None, 0.25])
def test_xml_and_tiff_masks_agree(tslide, tumour_slide, cfg, tissue_threshold):
    a = wsitile.build_grid(tslide, tumour_slide["mask"], tissue_threshold=tissue_threshold, **cfg)
    b = wsitile.build_grid(tslide, tumour_slide["xml"], tissue_threshold=tissue_threshold, **cfg)
    assert a.labels.sum() > 0
    np.testing.assert_array_equal(a.xy, b.xy)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_xml_of_another_slide_is_refused(tslide, tumour_slide, tmp_path, capsys, caplog):
    """An XML whose tumour polygons all lie wholly outside the slide (another slide's annotation) is an
    error naming both files, for the grid, the CLI and evaluation alike (it used to label nothing in
    `extract` and training without a word). Only some outside (a stray point): a warning, and the
    others label as before; one that crosses the slide's edge labels what it covers."""
    import logging

    from wsitile.cli import main
    from wsitile.evaluate import window_labels
    from wsitile.heatmap import Heatmap

    def with_polygons(name, polygons, keep_original):
        xml = tumour_slide["xml"].read_text()
        first, last = xml.index("<Annotation "), xml.rindex("</Annotation>") + len("</Annotation>")
        added = "".join('<Annotation Name="x" Type="Polygon" PartOfGroup="_0"><Coordinates>'
                        + "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i, (x, y) in enumerate(points))
                        + "</Coordinates></Annotation>" for points in polygons)
        path = tmp_path / name
        path.write_text(xml[:first] + added + (xml[first:] if keep_original else xml[last:]))
        return path

    width, height = tslide.dimensions
    far = [(9000, 100), (9500, 100), (9500, 600)]
    other = with_polygons("other.xml", [far], keep_original=False)
    message = (rf"{re.escape(str(other))}: tumour polygon 0 \(9000\.\.9500 x 100\.\.600\) lies outside slide "
               rf".*tumor_001\.tif \({width}x{height}\), as do all 1: mask and slide do not match")
    with pytest.raises(ValueError, match=message):
        wsitile.build_grid(tslide, other, **CONFIGS[0])
    assert main(["extract", str(tumour_slide["slide"]), "--mask", str(other), "--out", str(tmp_path / "e.npz")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lies outside slide" in err and not (tmp_path / "e.npz").exists(), err
    grid = wsitile.build_grid(tslide, None, tissue_threshold=None, **CONFIGS[0])
    heatmap = Heatmap(probs=np.zeros(len(grid), np.float32), coords=grid.coords, slide=str(tslide.path),
                      levels=np.array(grid.levels), window=grid.window, center=grid.center, stride=grid.stride,
                      grid_shape=tuple(grid.grid_shape))
    with pytest.raises(ValueError, match=message):
        window_labels(heatmap, other)

    original = wsitile.build_grid(tslide, tumour_slide["xml"], tissue_threshold=None, **CONFIGS[0])
    mixed = with_polygons("mixed.xml", [far], keep_original=True)
    with caplog.at_level(logging.WARNING, logger="wsitile.grid"):
        labels = wsitile.build_grid(tslide, mixed, tissue_threshold=None, **CONFIGS[0]).labels
    np.testing.assert_array_equal(labels, original.labels)
    (warning,) = [r.getMessage() for r in caplog.records if "outside slide" in r.getMessage()]
    assert warning.startswith(f"{mixed}: tumour polygon 0 (9000..9500 x 100..600)") and "1 of " in warning, warning

    # Across the right edge: kept, and labels the windows whose centres it covers.
    edge = with_polygons("edge.xml", [[(width - 300, 100), (width + 500, 100), (width + 500, 1600), (width - 300, 1600)]],
                         keep_original=True)
    with_edge = wsitile.build_grid(tslide, edge, tissue_threshold=None, **CONFIGS[0])
    last_column = with_edge.xy[:, 0] == with_edge.xy[:, 0].max()
    assert with_edge.labels[last_column].sum() > original.labels[last_column].sum()


def test_labels_do_not_depend_on_threads(tslide, tumour_slide):
    grids = [
        wsitile.build_grid(tslide, tumour_slide["mask"], tissue_threshold=None, threads=t, **CONFIGS[2])
        for t in (1, 2, 3)
    ]
    for g in grids[1:]:
        np.testing.assert_array_equal(g.labels, grids[0].labels)


def test_path_and_slide_object_give_same_grid(tslide, tumour_slide):
    a = wsitile.build_grid(tumour_slide["slide"], tumour_slide["mask"])
    b = wsitile.build_grid(tslide, str(tumour_slide["mask"]))
    np.testing.assert_array_equal(a.xy, b.xy)
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.fixture(scope="module")
def dotted_mask(normal_slide, tmp_path_factory):
    """A 4096 px mask for the normal slide with isolated single tumour pixels, many on the
    boundaries of centre squares (one level-0 pixel in or out), values 255 and 1 (tumour = > 0)."""
    rng = np.random.default_rng(99)
    mask = np.zeros((4096, 4096), dtype=np.uint8)
    pts = [tuple(p) for p in rng.integers(0, 4096, size=(60, 2))]
    # Around the centre squares of the (2, 3)/80/50/80 and (2,)/64/17/40 grids (d = 4).
    for window, center, stride in ((80, 50, 80), (64, 17, 40)):
        o = (window - center) // 2
        for k in range(12):
            i, j = rng.integers(0, 1024 // stride - 2, size=2)
            lo_x, lo_y = (i * stride + o) * 4, (j * stride + o) * 4
            hi_x, hi_y = (i * stride + o + center) * 4, (j * stride + o + center) * 4
            mid_y = (lo_y + hi_y) // 2
            pts += [(lo_x - 1, mid_y), (lo_x, mid_y + 1), (hi_x - 1, mid_y), (hi_x, mid_y - 7)]
            pts += [(lo_x + 9, lo_y - 1), (lo_x + 9, hi_y), (hi_x - 1, hi_y - 1), (lo_x - 1, lo_y - 1)]
    for n, (x, y) in enumerate(pts):
        if 0 <= x < 4096 and 0 <= y < 4096:
            mask[y, x] = 1 if n % 3 == 0 else 255
    path = tmp_path_factory.mktemp("dots") / "dots_mask.tif"
    tifffile.imwrite(path, mask, tile=(256, 256), compression="zlib", photometric="minisblack")
    return path


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2], dict(levels=(3,), window=33, center=33, stride=13)],
                         ids=["l23-w80-c50-s80", "l2-w64-c17-s40", "l3-w33-c33-s13"])
def test_single_pixel_boundaries(normal_slide, dotted_mask, cfg):
    """Isolated level-0 pixels just inside / just outside centre squares: max-pooling, half-open bounds."""
    slide = wsitile.Slide(normal_slide)
    grid = wsitile.build_grid(slide, dotted_mask, tissue_threshold=None, **cfg)
    base = cfg["levels"][0]
    d = int(slide.level_downsamples[base])
    _, xy, labels = reference_grid(
        read_mask_level0(dotted_mask), slide.level_dimensions[base], d, cfg["window"], cfg["center"], cfg["stride"]
    )
    assert 0 < labels.sum() < len(labels)
    np.testing.assert_array_equal(grid.xy, xy)
    np.testing.assert_array_equal(grid.labels, labels)


# ---- tissue filter ------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_tissue_filter_is_a_subset(tslide, tumour_slide, cfg):
    full = wsitile.build_grid(tslide, tumour_slide["mask"], tissue_threshold=None, **cfg)
    kept = wsitile.build_grid(tslide, tumour_slide["mask"], **cfg)  # default threshold 0.25
    assert kept.grid_shape == full.grid_shape
    idx = _index_of(kept.xy, full.grid_shape[1], cfg["stride"])
    assert (np.diff(idx) > 0).all()
    np.testing.assert_array_equal(full.xy[idx], kept.xy)
    np.testing.assert_array_equal(full.labels[idx], kept.labels)
    np.testing.assert_array_equal(full.coords[idx], kept.coords)
    fraction = len(kept) / len(full)
    assert 0.2 <= fraction <= 0.75, fraction  # tissue covers about 30-50% of the synthetic slide
    # Tumour lies on tissue: the filter keeps the tumour windows.
    assert kept.labels.sum() > 0


def test_default_threshold_is_quarter(tslide):
    assert len(wsitile.build_grid(tslide)) == len(wsitile.build_grid(tslide, tissue_threshold=0.25))
    assert len(wsitile.build_grid(tslide, tissue_threshold=0)) == len(wsitile.build_grid(tslide, tissue_threshold=None))


def test_threshold_is_monotone(tslide):
    sets = [set(map(tuple, wsitile.build_grid(tslide, tissue_threshold=t).xy)) for t in (0.05, 0.25, 0.6, 1.0)]
    for looser, stricter in zip(sets, sets[1:]):
        assert stricter <= looser
    assert len(sets[0]) > len(sets[-1])


def test_saturation_table_matches_skimage(tslide):
    """The tissue mask's saturation through a (max, min) table equals skimage's rgb2hsv, on every
    (max, min) pair, on random pixels and on the slide's tissue level."""
    from skimage.color import rgb2hsv

    from wsitile.tissue import saturation

    rng = np.random.default_rng(1)
    hi, lo = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    every = np.stack([lo, hi, (hi + lo) // 2], axis=-1).astype(np.uint8)  # max and min in other channels
    noise = rng.integers(0, 256, (123, 77, 3), dtype=np.uint8)
    level = tslide.read_region((0, 0), 3, tslide.level_dimensions[3])
    for rgb in (every, noise, level):
        np.testing.assert_array_equal(saturation(rgb), rgb2hsv(rgb)[..., 1])


def test_saturation_mask_matches_skimage_otsu(tslide, normal_slide):
    """The tissue threshold from the (max, min) histogram equals skimage's: rgb2hsv saturation,
    threshold_otsu on that image, floored at MIN_SATURATION, then `sat > threshold`; on the slides'
    tissue levels, noise, two-colour and one-colour images (threshold_otsu's early return) and glass
    (nothing above MIN_SATURATION)."""
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    from wsitile.tissue import MIN_SATURATION, saturation_mask

    def reference(rgb: np.ndarray) -> np.ndarray:
        sat = rgb2hsv(rgb)[..., 1]
        if float(sat.max()) <= MIN_SATURATION:
            return np.zeros(sat.shape, dtype=bool)
        return sat > max(float(threshold_otsu(sat)), MIN_SATURATION)

    rng = np.random.default_rng(2)
    normal = wsitile.Slide(normal_slide)
    images = [
        tslide.read_region((0, 0), 3, tslide.level_dimensions[3]),
        normal.read_region((0, 0), 2, normal.level_dimensions[2]),
        rng.integers(0, 256, (123, 77, 3), dtype=np.uint8),
        np.where(rng.random((40, 50, 1)) < 0.3, [200, 90, 160], [240, 238, 241]).astype(np.uint8),
        np.full((9, 7, 3), [200, 90, 160], np.uint8),
        np.full((9, 7, 3), 243, np.uint8),
    ]
    for k, rgb in enumerate(images):
        expected = reference(rgb)
        np.testing.assert_array_equal(saturation_mask(rgb), expected, err_msg=f"image {k}")
    assert images and reference(images[0]).any() and not reference(images[0]).all()


def _saturated_fraction(rgb: np.ndarray) -> float:
    """Share of pixels whose HSV saturation exceeds 0.1 (glass ~0.01, H&E stroma ~0.29)."""
    rgb = rgb.astype(np.float64)
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0)
    return float((sat > 0.1).mean())


@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 0.6, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (3, 3), (64, 97)])
def test_fill_holes_matches_scipy(density, shape):
    """tissue.fill_holes (one labelling pass) against scipy's binary_fill_holes (iterated dilation),
    on random masks whose holes touch the border or not, and on the tissue levels' cleaned masks."""
    from scipy import ndimage

    from wsitile import tissue

    cross = ndimage.generate_binary_structure(2, 1)
    rng = np.random.default_rng(len(shape) * 100 + int(density * 10) + shape[0])
    for _ in range(20):
        mask = rng.random(shape) < density
        np.testing.assert_array_equal(tissue.fill_holes(mask, cross), ndimage.binary_fill_holes(mask, cross))
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False  # one hole, filled; one notch at the border, kept
    ring[0, 2] = False
    filled = tissue.fill_holes(ring, cross)
    assert filled[2, 2] and not filled[0, 2]


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (2, 2), (3, 3), (64, 97)])
def test_erode_dilate_and_clean_mask_match_scipy(density, shape):
    """tissue.erode / dilate (shifted ANDs and ORs) against ndimage.binary_erosion / binary_dilation
    with the 4-neighbour cross, and clean_mask against scipy's opening, closing and hole filling."""
    from scipy import ndimage

    from wsitile import tissue

    cross = ndimage.generate_binary_structure(2, 1)
    rng = np.random.default_rng(shape[0] * 1000 + shape[1] + int(density * 10))
    for _ in range(20):
        mask = rng.random(shape) < density
        np.testing.assert_array_equal(tissue.erode(mask), ndimage.binary_erosion(mask, cross))
        np.testing.assert_array_equal(tissue.dilate(mask), ndimage.binary_dilation(mask, cross))
        closed = ndimage.binary_closing(ndimage.binary_opening(mask, structure=cross), structure=cross,
                                        iterations=2, border_value=0)
        np.testing.assert_array_equal(tissue.clean_mask(mask), ndimage.binary_fill_holes(closed, cross))
    assert not np.shares_memory(tissue.erode(mask), mask) and not np.shares_memory(tissue.dilate(mask), mask)


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (33, 1), (37, 53), (200, 130)])
def test_tissue_windows_match_window_means(shape, monkeypatch):
    """grid.tissue_windows (integral image at the windows' edge rows) against each window's mask
    pixels summed by NumPy, on random masks, for scales that put edges on every row or on few."""
    from wsitile import grid

    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    for trial in range(12):
        mask = rng.random(shape) < rng.choice([0.0, 0.1, 0.5, 0.9, 1.0])
        down = float(rng.choice([1.0, 2.0, 8.0, 16.0, 1.5]))  # mask downsample relative to the base level
        window, stride = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        threshold = float(rng.choice([0.01, 0.25, 0.5, 1.0]))
        base_w, base_h = int(shape[1] * down), int(shape[0] * down)
        if base_w < window or base_h < window:
            continue
        grid_shape = ((base_h - window) // stride + 1, (base_w - window) // stride + 1)

        class FakeSlide:
            level_downsamples = [1.0, down]

        monkeypatch.setattr(grid, "tissue_level", lambda slide, base, win: 1)
        monkeypatch.setattr(grid, "tissue_mask", lambda slide, level: mask)
        got = grid.tissue_windows(FakeSlide(), 0, window, stride, grid_shape, threshold)
        expected = []
        for j in range(grid_shape[0]):
            for i in range(grid_shape[1]):
                x0, y0 = i * stride, j * stride
                lo_x, lo_y = int(np.floor(x0 / down)), int(np.floor(y0 / down))
                hi_x = max(int(np.ceil((x0 + window) / down)), lo_x + 1)
                hi_y = max(int(np.ceil((y0 + window) / down)), lo_y + 1)
                lo_x, hi_x = min(lo_x, shape[1]), min(hi_x, shape[1])
                lo_y, hi_y = min(lo_y, shape[0]), min(hi_y, shape[0])
                part = mask[lo_y:hi_y, lo_x:hi_x]
                if part.sum() > 0 and part.sum() >= threshold * max(part.size, 1):
                    expected.append((x0, y0))
        np.testing.assert_array_equal(got.reshape(-1, 2), np.asarray(expected, np.int64).reshape(-1, 2),
                                      err_msg=f"trial {trial}: down {down}, window {window}, stride {stride}")


def test_clean_mask_fill_matches_scipy_on_slides(tslide, normal_slide):
    from scipy import ndimage

    from wsitile import tissue

    for s in (tslide, wsitile.Slide(normal_slide)):
        level = s.level_count - 1
        w, h = s.level_dimensions[level]
        raw = tissue.saturation_mask(s.read_region((0, 0), level, (w, h)))
        cross = ndimage.generate_binary_structure(2, 1)
        closed = ndimage.binary_closing(ndimage.binary_opening(raw, structure=cross), structure=cross,
                                        iterations=2, border_value=0)
        np.testing.assert_array_equal(tissue.clean_mask(raw), ndimage.binary_fill_holes(closed))


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1]], ids=CONFIG_IDS[:2])
def test_glass_dropped_tissue_kept(normal_slide, cfg):
    slide = wsitile.Slide(normal_slide)
    full = wsitile.build_grid(slide, None, tissue_threshold=None, **cfg)
    kept = set(map(tuple, wsitile.build_grid(slide, None, **cfg).xy))
    base, w = cfg["levels"][0], cfg["window"]
    d = slide.level_downsamples[base]
    level_img = slide.read_region((0, 0), base, slide.level_dimensions[base])
    glass = tissue = 0
    for x, y in full.xy:
        frac = _saturated_fraction(level_img[y : y + w, x : x + w])
        if frac <= 0.01:
            glass += 1
            assert (x, y) not in kept, f"window at level-{base} ({x}, {y}) is white glass but kept"
        elif frac >= 0.97:
            tissue += 1
            assert (x, y) in kept, f"window at level-{base} ({x}, {y}) is all tissue but dropped"
    assert glass >= 3 and tissue >= 3, (glass, tissue)
    assert d == 2**base


# ---- bad input ----------------------------------------------------------------------------------


def test_level_out_of_range(tslide):
    with pytest.raises(ValueError, match=r"level 5 out of range.*levels 0\.\.4"):
        wsitile.build_grid(tslide, levels=(2, 5))
    with pytest.raises(ValueError, match=r"level -1 out of range.*levels 0\.\.4"):
        wsitile.build_grid(tslide, levels=(-1,))


def test_levels_must_increase_and_be_given(tslide):
    with pytest.raises(ValueError, match="levels"):
        wsitile.build_grid(tslide, levels=(3, 2))
    with pytest.raises(ValueError, match="levels"):
        wsitile.build_grid(tslide, levels=(2, 2))
    with pytest.raises(ValueError, match="levels"):
        wsitile.build_grid(tslide, levels=())


def test_window_larger_than_level(tslide, tumour_slide):
    with pytest.raises(ValueError, match=r"window 600.*level 4 \(512x512"):
        wsitile.build_grid(tslide, levels=(4,), window=600, center=10)
    # exactly the level's size is one window
    g = wsitile.build_grid(tslide, levels=(4,), window=512, center=10, tissue_threshold=None)
    assert g.grid_shape == (1, 1) and len(g) == 1


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(window=80, center=81), "center 81"),
        (dict(window=80, center=0), "center 0"),
        (dict(stride=0), "stride 0"),
        (dict(stride=-3), "stride -3"),
        (dict(window=0, center=1), "window 0"),
        (dict(threads=0), "threads 0"),
    ],
)
def test_bad_parameters(tslide, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        wsitile.build_grid(tslide, **kwargs)


def test_mask_size_mismatch(tslide, tmp_path):
    path = tmp_path / "small_mask.tif"
    tifffile.imwrite(path, np.zeros((1024, 768), np.uint8), tile=(256, 256), compression="zlib")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*768x1024.*8192x8192"):
        wsitile.build_grid(tslide, path)


def test_malformed_xml_mask(tslide, tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text('<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation')
    with pytest.raises(ValueError, match=re.escape(str(path))):
        wsitile.build_grid(tslide, path)


def test_missing_mask(tslide, tmp_path):
    for name in ("absent_mask.tif", "absent.xml"):
        path = tmp_path / name
        with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
            wsitile.build_grid(tslide, path)


def test_missing_slide(tmp_path):
    path = tmp_path / "absent.tif"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        wsitile.build_grid(path)
