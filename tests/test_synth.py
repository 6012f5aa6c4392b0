"""wsitile.synth: synthetic Camelyon16-style slides, checked with OpenSlide and tifffile."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import openslide
import pytest
import tifffile

from wsitile import synth
from wsitile.masks import read_asap_xml, rasterize

SIZE = 4096  # levels 0..3, as the 40x / 20x / 10x / 5x of a real slide


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = synth.synth_dataset(out, slides=3, seed=11, size=SIZE, progress=False)
    return out, manifest


@pytest.fixture(scope="module")
def tumour_slide(dataset):
    out, _ = dataset
    return out / "tumor_001.tif", out / "tumor_001_mask.tif", out / "tumor_001.xml"


def _rgb(slide: openslide.OpenSlide, level: int) -> np.ndarray:
    w, h = slide.level_dimensions[level]
    return np.asarray(slide.read_region((0, 0), level, (w, h)))[..., :3]


def _pool(a: np.ndarray, k: int, op) -> np.ndarray:
    """k x k pooling with ceil size (edge pixels repeated), as each level halves rounding up."""
    h, w = a.shape[:2]
    H, W = -(-h // k) * k, -(-w // k) * k
    pad = [(0, H - h), (0, W - w)] + [(0, 0)] * (a.ndim - 2)
    a = np.pad(a, pad, mode="edge")
    return op(a.reshape(H // k, k, W // k, k, *a.shape[2:]), axis=(1, 3))


def test_files_and_manifest(dataset):
    out, manifest = dataset
    assert manifest == out / "manifest.csv"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "manifest.csv", "normal_001.tif", "tumor_001.tif", "tumor_001.xml", "tumor_001_mask.tif",
        "tumor_002.tif", "tumor_002.xml", "tumor_002_mask.tif",
    ]
    with open(manifest, newline="") as fh:
        assert fh.readline() == "slide,label,split\n"
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [
        {"slide": "tumor_001.tif", "label": "tumor", "split": "train"},
        {"slide": "tumor_002.tif", "label": "tumor", "split": "test"},  # last of a class of >= 2
        {"slide": "normal_001.tif", "label": "normal", "split": "train"},  # a class of 1 stays train
    ]


@pytest.mark.parametrize(
    ("slides", "fraction", "want"),
    [(1, 1 / 3, (1, 0)), (1, 1.0, (0, 1)), (2, 0.0, (1, 1)), (2, 1.0, (1, 1)), (6, 1 / 3, (4, 2)),
     (9, 0.5, (4, 5)), (10, 0.25, (7, 3))],
)
def test_class_counts(slides, fraction, want):
    assert synth._class_counts(slides, fraction) == want


def test_slide_opens_with_levels_and_mpp(tumour_slide, dataset):
    for path in (tumour_slide[0], dataset[0] / "normal_001.tif"):
        s = openslide.OpenSlide(path)
        assert s.level_count == 4
        assert s.level_dimensions == ((4096, 4096), (2048, 2048), (1024, 1024), (512, 512))
        assert s.level_downsamples == pytest.approx((1, 2, 4, 8))
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.243, abs=1e-9)
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.243, abs=1e-9)


def test_level_shapes_rule():
    assert len(synth.level_shapes(16384, 16384)) == 6
    assert len(synth.level_shapes(8192, 8192)) == 5
    assert synth.level_shapes(4096, 4096)[-1] == (512, 512)
    assert synth.level_shapes(3001, 999) == [(3001, 999), (1501, 500), (751, 250)]
    assert synth.level_shapes(600, 600) == [(600, 600)]


def test_levels_are_downsamples_of_level0(tumour_slide):
    s = openslide.OpenSlide(tumour_slide[0])
    level0 = _rgb(s, 0).astype(np.float32)
    for k in (1, 2, 3):
        want = _pool(level0, 2**k, np.mean)
        got = _rgb(s, k).astype(np.float32)
        assert got.shape == want.shape
        assert np.abs(got - want).mean() < 4.0  # JPEG at each level; structure must match


def test_looks_like_he(tumour_slide):
    s = openslide.OpenSlide(tumour_slide[0])
    thumb = _rgb(s, 3).reshape(-1, 3).astype(int)
    glass = (thumb.min(axis=1) > 225) & (np.ptp(thumb, axis=1) < 12)
    assert 0.25 < 1 - glass.mean() < 0.6  # tissue covers roughly 30-50%
    tissue = thumb[~glass]
    assert (tissue[:, 0] > tissue[:, 1]).mean() > 0.9  # pink/purple: red and blue over green
    assert (tissue[:, 2] > tissue[:, 1]).mean() > 0.9


def test_mask_level0_is_rasterized_xml(tumour_slide):
    _, mask_path, xml_path = tumour_slide
    ann = read_asap_xml(xml_path)
    assert 1 <= len(ann.tumour) <= 4
    with tifffile.TiffFile(mask_path) as tf:
        level0 = tf.pages[0].asarray()
        assert tf.pages[0].is_tiled and tf.pages[0].tilewidth == 256
        assert tf.pages[0].compression in (tifffile.COMPRESSION.ADOBE_DEFLATE, tifffile.COMPRESSION.LZW)
    assert level0.dtype == np.uint8 and level0.shape == (SIZE, SIZE)
    want = rasterize(ann, 0, 0, SIZE, SIZE)
    assert want.any()
    np.testing.assert_array_equal(level0, want.astype(np.uint8) * 255)
    # Vertices are non-integer floats, as in Camelyon16.
    assert any((p != np.round(p)).any() for p in ann.tumour)


def test_mask_levels_are_max_pools(tumour_slide):
    with tifffile.TiffFile(tumour_slide[1]) as tf:
        pages = [p.asarray() for p in tf.pages]
        assert [p.subfiletype for p in tf.pages] == [0, 1, 1, 1]
    assert len(pages) == 4
    for k in range(1, 4):
        np.testing.assert_array_equal(pages[k], _pool(pages[0], 2**k, np.max))


def test_openslide_reads_mask(tumour_slide):
    _, mask_path, xml_path = tumour_slide
    m = openslide.OpenSlide(mask_path)
    assert m.level_count == 4
    region = np.asarray(m.read_region((0, 0), 0, (SIZE, SIZE)))
    want = rasterize(read_asap_xml(xml_path), 0, 0, SIZE, SIZE)
    np.testing.assert_array_equal(region[..., 0] > 0, want)


def test_some_tumour_has_exclusion_hole(dataset):
    out, _ = dataset
    anns = [read_asap_xml(out / f"tumor_00{i}.xml") for i in (1, 2)]
    assert any(a.exclusion for a in anns)
    # The hole is normal tissue: its pixels are not tumour although inside a tumour polygon.
    a = next(a for a in anns if a.exclusion)
    x0, y0, x1, y1 = (int(v) for v in (*a.exclusion[0].min(axis=0), *a.exclusion[0].max(axis=0)))
    from wsitile.masks import Annotations, fill_polygons

    inside_tumour = fill_polygons(a.tumour, x0, y0, x1 - x0, y1 - y0)
    in_hole = fill_polygons(a.exclusion, x0, y0, x1 - x0, y1 - y0)
    assert (inside_tumour & in_hole).any()
    assert not (rasterize(a, x0, y0, x1 - x0, y1 - y0) & in_hole).any()
    assert Annotations(tumour=a.tumour).bbox() is not None


def test_tumour_differs_in_colour_at_levels_2_and_3(tumour_slide):
    slide_path, mask_path, _ = tumour_slide
    s, m = openslide.OpenSlide(slide_path), openslide.OpenSlide(mask_path)
    for level in (2, 3):
        img = _rgb(s, level).reshape(-1, 3).astype(float)
        tum = (_rgb(m, level)[..., 0] > 0).ravel()
        tissue = img.min(axis=1) < 225
        normal = tissue & ~tum
        assert tum.sum() > 20 and normal.sum() > 1000
        t_mean, n_mean = img[tum].mean(axis=0), img[normal].mean(axis=0)
        assert n_mean[0] - t_mean[0] > 15  # darker
        assert n_mean[1] - t_mean[1] > 15
        assert (t_mean[2] - t_mean[1]) > (n_mean[2] - n_mean[1])  # more purple (blue over green)


def test_deterministic(tmp_path):
    def digests(d):
        synth.synth_dataset(d, slides=2, seed=5, size=1024, progress=False)
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}

    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert a == b and len(a) == 5
    other = tmp_path / "c"
    synth.synth_dataset(other, slides=2, seed=6, size=1024, progress=False)
    assert hashlib.sha256((other / "tumor_001.tif").read_bytes()).hexdigest() != a["tumor_001.tif"]


def test_chunks_do_not_depend_on_neighbours():
    scene = synth._make_scene(3000, 3000, 4, True)
    a = synth._render_chunk(scene, 1, 2)
    synth._render_chunk(scene, 0, 0)
    np.testing.assert_array_equal(synth._render_chunk(scene, 1, 2), a)
    assert a.shape == (3000 - 2 * synth.CHUNK, synth.CHUNK, 3)


def test_odd_size_slide(tmp_path):
    path = tmp_path / "odd.tif"
    synth.write_slide(path, 1999, seed=1, tumour=True)
    s = openslide.OpenSlide(path)
    assert s.level_dimensions == ((1999, 1999), (1000, 1000), (500, 500))
    with tifffile.TiffFile(tmp_path / "odd_mask.tif") as tf:
        pages = [p.asarray() for p in tf.pages]
    np.testing.assert_array_equal(pages[1], _pool(pages[0], 2, np.max))
    np.testing.assert_array_equal(pages[0] > 0, rasterize(read_asap_xml(tmp_path / "odd.xml"), 0, 0, 1999, 1999))


def test_sparse_gigapixel_slide(tmp_path):
    path = tmp_path / "sparse_001.tif"
    x0, y0, x1, y1 = synth.write_sparse_slide(path, seed=2)
    s = openslide.OpenSlide(path)
    w, h = s.dimensions
    assert w * h > 2**31
    assert s.level_count == 8
    patch = np.asarray(s.read_region((x0, y0), 0, (x1 - x0, y1 - y0)))
    assert (patch[..., 3] == 255).all()
    assert (patch[..., :3].min(axis=2) < 200).mean() > 0.2  # tissue, far beyond pixel index 2^31
    corner = np.asarray(s.read_region((w - 200, h - 200), 0, (300, 300)))  # partly outside the slide
    glass = corner[:200, :200, :3].reshape(-1, 3)
    assert (glass.min(axis=0) > 235).all() and (corner[200:, 200:, 3] == 0).all()
    low = np.asarray(s.read_region((x0, y0), 4, ((x1 - x0) // 16, (y1 - y0) // 16)))[..., :3]
    assert np.abs(low.astype(float).mean(axis=(0, 1)) - patch[..., :3].mean(axis=(0, 1))).max() < 4


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"slides": 0}, "slides"), ({"slides": 2.5}, "slides"), ({"size": 100}, "size"), ({"size": True}, "size"),
     ({"normal_fraction": 1.5}, "normal_fraction"), ({"normal_fraction": float("nan")}, "normal_fraction"),
     ({"normal_fraction": -0.1}, "normal_fraction"), ({"seed": -1}, "seed")],
)
def test_bad_arguments(tmp_path, kwargs, name):
    args = {"slides": 2, "size": 1024, **kwargs}
    with pytest.raises(ValueError, match=name):
        synth.synth_dataset(tmp_path, progress=False, **args)
    assert not list(tmp_path.iterdir())


def test_write_slide_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        synth.write_slide(tmp_path / "x.tif", 10, seed=0, tumour=False)
    with pytest.raises(ValueError, match="seed"):
        synth.write_slide(tmp_path / "x.tif", 1024, seed=-3, tumour=False)
