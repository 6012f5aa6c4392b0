"""Camelyon16 challenge metrics (`wsitile froc`): candidates, evaluation masks, the lesion FROC as the
organisers' Evaluation_FROC.py computes it (answers worked out by hand), the slide AUC and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
from skimage import measure
from sklearn.metrics import roc_auc_score

import wsitile
from wsitile.cli import main
from wsitile.froc import (
    candidates,
    detections,
    distance_threshold,
    evaluation_mask,
    froc_curve,
    froc_evaluate,
    froc_score,
    itc_labels,
    itc_threshold,
    read_detections_csv,
    read_mask_level,
    slide_auc,
    write_detections_csv,
)
from wsitile.heatmap import Heatmap, save_heatmap
from wsitile.masks import Annotations, write_asap_xml

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def at(row: int, col: int, p: float) -> tuple[float, int, int]:
    """A detection (probability, x, y) whose level-0 point falls in level-5 pixel (row, col)."""
    return (p, col * 32 + 7, row * 32 + 20)


def rect(shape, *boxes) -> np.ndarray:
    """A level-5 tumour mask with tumour in each (row0, row1, col0, col1) box, half-open."""
    m = np.zeros(shape, dtype=bool)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


# --------------------------------------------------------------------------------------------------
# The evaluation mask


def test_the_organisers_constants():
    assert distance_threshold() == pytest.approx(75 / (0.243 * 32 * 2)) == pytest.approx(4.8225, abs=1e-4)
    assert itc_threshold() == pytest.approx(275 / (0.243 * 32)) == pytest.approx(35.365, abs=1e-3)


@pytest.mark.parametrize(("gap", "lesions"), [(8, 1), (9, 2)])
def test_distance_threshold_merges_close_tumours(gap, lesions):
    # Two 40x20 tumours side by side with `gap` empty columns between them. A gap pixel i columns
    # from the left tumour is min(i, gap + 1 - i) px from tumour; it joins the lesion when < 4.8225.
    # gap 8: the middle columns i = 4, 5 are 4 px away -> covered -> one lesion.
    # gap 9: the middle column i = 5 is 5 px from both -> a clear column -> two lesions.
    mask = rect((60, 80), (10, 50, 10, 30), (10, 50, 30 + gap, 50 + gap))
    labels = evaluation_mask(mask)
    assert labels.max() == lesions
    # Growth: 4 px around the tumour (4 < 4.8225), not 5. Off the corner (10, 10), up and left by
    # (3, 3) = 4.24 px or (4, 2) = 4.47 px is in, (4, 3) = 5 px is out.
    assert labels[30, 6] and not labels[30, 5]
    assert labels[7, 7] and labels[6, 8] and labels[8, 6]
    assert not labels[6, 7] and not labels[7, 6]


def test_holes_are_filled():
    # A 40x40 tumour ring, 2 px thick: the 36x36 hole is far wider than the growth (4 px in from each
    # side leaves 28x28 uncovered) but binary_fill_holes makes it part of the lesion.
    mask = rect((60, 60), (10, 50, 10, 50))
    mask[12:48, 12:48] = False
    labels = evaluation_mask(mask)
    assert labels.max() == 1 and labels[30, 30] == 1
    fp, tp, n = wsitile.froc.slide_hits(np.array([at(30, 30, 0.8)]), labels, itc_labels(labels))
    assert fp.size == 0 and tp.tolist() == [np.float32(0.8)] and n == 1


def test_itc_rule_is_the_major_axis():
    # A single tumour pixel grows to a disc about 9 px across: an isolated-tumour-cell region.
    # A 40x30 tumour grows to about 48x38: major axis well over 35.37 px, a lesion.
    mask = rect((100, 100), (10, 50, 10, 40), (80, 81, 80, 81))
    labels = evaluation_mask(mask)
    assert labels.max() == 2
    itc = itc_labels(labels)
    assert itc == [labels[80, 80]]
    # The rule as skimage states it, computed independently.
    props = {p.label: p.axis_major_length for p in measure.regionprops(labels)}
    assert itc == [lab for lab, length in props.items() if length < 275 / (0.243 * 32)]
    assert props[labels[80, 80]] < 35.37 < props[labels[30, 20]]


def test_empty_mask_has_no_lesion():
    assert evaluation_mask(np.zeros((20, 20), bool)).max() == 0


# --------------------------------------------------------------------------------------------------
# The FROC, by hand


def test_froc_worked_out_by_hand():
    # Slide A (tumour): lesions L1, L2 and an ITC (one tumour pixel); slide B (tumour): lesion L3;
    # slide C: normal.
    a = evaluation_mask(rect((100, 150), (10, 50, 10, 40), (10, 50, 70, 100), (80, 81, 130, 131)))
    b = evaluation_mask(rect((100, 150), (40, 80, 40, 80)))
    assert (a.max(), b.max()) == (3, 1)
    l1, l2, itc = a[30, 25], a[30, 85], a[80, 130]
    assert itc_labels(a) == [itc] and itc_labels(b) == []
    dets_a = np.array([
        at(30, 42, 0.9),  # L1, in its grown margin (3 px right of the tumour): a hit, L1 = 0.9
        at(20, 20, 0.6),  # L1 again, lower: changes nothing, and is no false positive
        at(80, 130, 0.7),  # the ITC: neither true nor false positive
        at(30, 85, 0.5),  # L2 = 0.5
        at(90, 20, 0.4),  # background: FP 0.4
    ])
    dets_b = np.array([at(10, 10, 0.8), at(60, 60, 0.3)])  # FP 0.8; L3 = 0.3
    dets_c = np.array([at(5, 5, 0.5), at(50, 50, 0.2)])  # normal slide: FPs 0.5, 0.2
    fp, tp, n = wsitile.froc.slide_hits(dets_a, a, itc_labels(a))
    assert fp.tolist() == [0.4] and n == 2
    assert tp[l1 - 1] == np.float32(0.9) and tp[l2 - 1] == np.float32(0.5) and tp[itc - 1] == 0
    # FP probabilities: 0.4, 0.8, 0.5, 0.2; lesion scores (one per label, ITC and misses 0): 0.9, 0.5, 0,
    # 0.3; 3 lesions, 3 slides. Thresholds: distinct values {0, .2, .3, .4, .5, .8, .9} without the
    # smallest (the original's all_probs[1:]), then the appended (0, 0):
    #   threshold   0.2  0.3  0.4  0.5  0.8  0.9  end
    #   FPs >= t     4    3    3    2    1    0    0     / 3 slides
    #   TPs >= t     3    3    2    2    1    1    0     / 3 lesions
    result = froc_score([dets_a, dets_b, dets_c], [a, b, None])
    np.testing.assert_allclose(result.fps, np.array([4, 3, 3, 2, 1, 0, 0]) / 3)
    np.testing.assert_allclose(result.sensitivity, np.array([3, 3, 2, 2, 1, 1, 0]) / 3)
    # np.interp over the reversed curve: xp = 0, 0, 1/3, 2/3, 1, 1, 4/3; fp = 0, 1/3, 1/3, 2/3, 2/3, 1, 1.
    #   1/4 FP: between (0, 1/3) and (1/3, 1/3)                      -> 1/3
    #   1/2 FP: between (1/3, 1/3) and (2/3, 2/3): 1/3 + (1/6) * 1  -> 1/2
    #   1 FP: a repeated abscissa; np.interp takes the last repeat   -> 1
    #   2, 4, 8 FP: beyond the curve, its last value                 -> 1
    np.testing.assert_allclose(result.sensitivities, [1 / 3, 1 / 2, 1, 1, 1, 1])
    assert result.score == pytest.approx((1 / 3 + 1 / 2 + 4) / 6) == pytest.approx(29 / 36)
    assert (result.n_slides, result.n_lesions, result.n_itc) == (3, 3, 1)


def test_froc_skips_the_smallest_probability_as_the_original_does():
    # One tumour slide, one lesion, one detection on it at 0.7: the only distinct value is 0.7, which
    # the original drops (all_probs[1:]), leaving just the (0, 0) point: score 0.
    lesion = evaluation_mask(rect((60, 60), (10, 50, 10, 50)))
    hit = np.array([at(30, 30, 0.7)])
    assert froc_score([hit], [lesion]).score == 0.0
    # Add a normal slide with a false positive at 0.2: now 0.2 is dropped and 0.7 is a threshold with
    # 0 FP and the lesion found: curve (0, 1), (0, 0) -> reversed xp 0, 0 / fp 0, 1 -> 1 everywhere.
    result = froc_score([hit, np.array([at(5, 5, 0.2)])], [lesion, None])
    np.testing.assert_allclose(result.fps, [0, 0])
    np.testing.assert_allclose(result.sensitivity, [1, 0])
    assert result.score == 1.0


def test_froc_curve_keeps_float32_lesion_scores():
    # A lesion scored 0.7 (stored float32) and a false positive at the float64 0.7 are different values.
    fps, sens = froc_curve([np.array([0.7])], [np.array([0.7], np.float32), np.array([0.0], np.float32)], 2, 1)
    assert float(np.float32(0.7)) < 0.7  # so thresholds 0.69999999 (float32) and 0.7 (float64) both exist
    np.testing.assert_allclose(fps, [1, 1, 0])
    np.testing.assert_allclose(sens, [0.5, 0, 0])


def test_froc_without_lesions_is_undefined():
    with pytest.raises(ValueError, match="no lesion"):
        froc_score([np.array([at(1, 1, 0.9)])], [None])
    itc_only = evaluation_mask(rect((30, 30), (10, 11, 10, 11)))
    with pytest.raises(ValueError, match="no lesion"):
        froc_score([np.zeros((0, 3))], [itc_only])


def test_slide_auc_is_scikit_learns():
    scores, truth = [0.9, 0.4, 0.7, 0.8, 0.2], [True, False, True, False, False]
    assert slide_auc(scores, truth) == roc_auc_score(truth, scores) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="all 2 slides are normal"):
        slide_auc([0.1, 0.2], [False, False])


# --------------------------------------------------------------------------------------------------
# Candidates and the CSV


def peaks_image() -> np.ndarray:
    img = np.full((12, 12), 0.2)
    img[0, 0] = np.nan  # no tissue
    img[5, 5], img[5, 6], img[5, 7] = 0.9, 0.6, 0.8  # two maxima 2 cells apart, a saddle between
    img[10, 10] = 0.7  # a lone maximum
    img[1, 10] = 0.45  # a maximum below 0.5: never a candidate
    img[2, 2] = img[2, 3] = 0.75  # a plateau: both cells are local maxima
    return img


@pytest.mark.parametrize(
    ("radius", "expected"),
    [
        (0, [(5, 5), (5, 7), (2, 2), (2, 3), (10, 10)]),  # every local maximum >= 0.5
        (1, [(5, 5), (5, 7), (2, 2), (10, 10)]),  # the plateau's second cell is 1 cell away
        (2, [(5, 5), (2, 2), (10, 10)]),  # (5, 7) is exactly 2 cells from (5, 5): within the radius
    ],
)
def test_candidates_local_maxima_and_nms(radius, expected):
    rows, cols, probs = candidates(peaks_image(), radius=radius)
    assert list(zip(rows.tolist(), cols.tolist())) == expected
    assert np.all(np.diff(probs) <= 0) and probs.min() >= 0.5


@pytest.mark.parametrize("radius", [1.5, 3, 7.9, 12])
def test_wide_radius_nms_equals_the_disc(monkeypatch, radius):
    """Radii past the disc stencil's limit check distances to the kept candidates: the same rule, so
    with the limit lowered both ways agree on random heatmaps; an infinite radius keeps the maximum."""
    import wsitile.froc as froc

    rng = np.random.default_rng(int(radius * 10))
    for _ in range(5):
        img = rng.random((40, 57))
        img[rng.random(img.shape) < 0.1] = np.nan
        disc = candidates(img, radius=radius)
        monkeypatch.setattr(froc, "_DISC_RADIUS", 0.5)
        wide = candidates(img, radius=radius)
        monkeypatch.undo()
        assert len(disc[0]) > 1
        for a, b in zip(disc, wide):
            np.testing.assert_array_equal(a, b)
    rows, cols, probs = candidates(img, radius=float("inf"))
    assert len(rows) == 1 and probs[0] == np.nanmax(img)
    assert len(candidates(img, radius=1e5)[0]) == 1  # no 1e5-cell stencil


def test_detections_at_window_centres_and_csv(tmp_path):
    img = peaks_image()
    rows, cols = np.nonzero(~np.isnan(img))
    d0 = 4.0
    heatmap = Heatmap(coords=np.stack([cols, rows], axis=1) * 80 * 4, probs=img[rows, cols].astype(np.float32),
                      levels=np.array([2, 3]), window=80, center=50, stride=80, grid_shape=(12, 12),
                      slide="/nowhere/slide_x.tif")
    dets = detections(heatmap, radius=2)  # the slide is gone: d0 = 4 from the coordinates
    np.testing.assert_array_equal(dets, detections(heatmap, radius=2, downsample=d0))
    # Window (row 5, col 5): level-2 top-left (400, 400), centre (440, 440) -> level 0 (1760, 1760).
    np.testing.assert_array_equal(dets[:, 1:], [[1760, 1760], [(2 * 80 + 40) * 4] * 2, [(10 * 80 + 40) * 4] * 2])
    path = tmp_path / "slide_x.csv"
    write_detections_csv(path, dets)
    lines = path.read_text().splitlines()
    assert lines[0] == f"{float(np.float32(0.9))!r},1760,1760" == "0.8999999761581421,1760,1760"
    assert lines[2] == "0.699999988079071,3360,3360" and len(lines) == 3
    np.testing.assert_array_equal(read_detections_csv(path), dets)  # exact round trip


# --------------------------------------------------------------------------------------------------
# Evaluation masks from files


def write_pyramid(path, level0, reduced):
    with tifffile.TiffWriter(path) as tw:
        tw.write(level0, tile=(256, 256), compression="zlib", subfiletype=0)
        for page in reduced:
            tw.write(page, subfiletype=1)


def test_level5_page_is_used_as_it_is_else_max_pooled(tmp_path):
    level0 = np.zeros((1024, 1024), np.uint8)
    level0[100:200, 300:400] = 255
    # A level-5 page that disagrees with level 0 on purpose: the file's own page must win.
    odd = np.zeros((32, 32), np.uint8)
    odd[0, 0] = 255
    pages = [np.zeros((1024 >> k, 1024 >> k), np.uint8) for k in range(1, 5)] + [odd]
    write_pyramid(tmp_path / "with5.tif", level0, pages)
    got = read_mask_level(tmp_path / "with5.tif", 32, slide_size=(1024, 1024))
    assert got.shape == (32, 32) and got.sum() == 1 and got[0, 0]
    got = read_mask_level(tmp_path / "with5.tif", 64)  # no 16x16 page: max-pool of the 32x32 one
    assert got.shape == (16, 16) and got.sum() == 1 and got[0, 0]
    # Level 0 only: max-pooled by 32. Rows 100..199 -> 3..6, columns 300..399 -> 9..12.
    write_pyramid(tmp_path / "flat.tif", level0, [])
    got = read_mask_level(tmp_path / "flat.tif", 32)
    expected = np.zeros((32, 32), bool)
    expected[3:7, 9:13] = True
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match=r"flat\.tif: mask level-0 size 1024x1024 does not match slide other\.tif"):
        read_mask_level(tmp_path / "flat.tif", 32, slide_size=(2048, 1024), slide_path="other.tif")


def test_xml_and_tiff_masks_give_one_evaluation_mask(tumour_slide):
    from_tiff = read_mask_level(tumour_slide["mask"], 32, slide_size=(8192, 8192))  # page 4 pooled by 2
    from_xml = read_mask_level(tumour_slide["xml"], 32, slide_size=(8192, 8192))
    assert from_tiff.shape == from_xml.shape == (256, 256) and from_tiff.any()
    np.testing.assert_array_equal(from_tiff, from_xml)


# --------------------------------------------------------------------------------------------------
# froc_evaluate and the CLI


@pytest.fixture(scope="module")
def froc_inputs(tumour_slide, normal_slide, tmp_path_factory):
    """Heatmaps of the tumour and the normal fixture slides and a masks folder whose XML marks a
    1400 px square lesion (the generator's own tumours are ITC-sized at 8192 px)."""
    root = tmp_path_factory.mktemp("froc")
    masks = root / "masks"
    masks.mkdir()
    grid = wsitile.build_grid(tumour_slide["slide"])
    centres = grid.coords + 40 * 4  # window centres, level 0 (d0 = 4)
    middle = centres[np.argmin(np.abs(centres - np.median(centres, axis=0)).sum(axis=1))]
    x, y = middle.tolist()
    square = np.array([[x - 700, y - 700], [x + 700, y - 700], [x + 700, y + 700], [x - 700, y + 700]], float)
    write_asap_xml(masks / "tumor_001.xml", Annotations(tumour=(square,)))
    probs = np.full(len(grid), 0.2, np.float32)
    near = np.abs(centres - middle).max(axis=1) <= 400  # centres at least 300 px inside the square
    probs[near] = 0.9
    far = int(np.argmax(np.abs(centres - middle).max(axis=1)))
    probs[far] = 0.95  # a false positive on the tumour slide, above the lesion's score
    save_heatmap(root / "tumour.npz", Heatmap.from_grid(grid, probs))
    normal = wsitile.build_grid(normal_slide)
    nprobs = np.full(len(normal), 0.2, np.float32)
    nprobs[0] = 0.7  # one false positive on the normal slide
    save_heatmap(root / "normal.npz", Heatmap.from_grid(normal, nprobs))
    return {"root": root, "masks": masks, "tumour": root / "tumour.npz", "normal": root / "normal.npz",
            "near": int(near.sum()), "far_centre": centres[far].tolist()}


def test_froc_cli_on_a_tumour_and_a_normal_slide(froc_inputs, capsys):
    out = froc_inputs["root"] / "out"
    code, stdout, err = run(["froc", froc_inputs["tumour"], froc_inputs["normal"], "--masks-dir",
                             froc_inputs["masks"], "--out", out], capsys)
    assert code == 0, err
    assert "froc" in stdout and "slide_auc" in stdout
    # FPs: 0.95 (tumour slide), 0.7 (normal slide); the one lesion scores 0.9; 2 slides.
    #   threshold    0.9  0.95  end        (0.7, the smallest distinct value, is dropped)
    #   FPs / 2      1/2  1/2   0
    #   TPs / 1       1    0    0
    # reversed xp 0, 1/2, 1/2 / fp 0, 0, 1: at 1/4 FP -> 0; at 1/2 (repeated) -> 1; beyond -> 1.
    # FROC = (0 + 1 + 4) / 6 = 5/6. Slide AUC: 0.95 (tumour) > 0.7 (normal) -> 1.
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["froc", "slide_auc"]
    assert metrics["froc"] == pytest.approx(5 / 6) and metrics["slide_auc"] == 1.0
    assert (out / "froc.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in out.iterdir()) == ["froc.png", "metrics.json", "normal_001.csv", "tumor_001.csv"]
    tumour_rows = [line.split(",") for line in (out / "tumor_001.csv").read_text().splitlines()]
    assert tumour_rows[0] == [repr(float(np.float32(0.95))), *map(str, froc_inputs["far_centre"])]
    assert 2 <= len(tumour_rows) - 1 <= froc_inputs["near"]  # the 0.9 plateau, thinned by NMS
    assert all(row[0] == repr(float(np.float32(0.9))) for row in tumour_rows[1:])
    assert (out / "normal_001.csv").read_text().startswith("0.699999988079071,")
    # The Python API gives the same, and so does the FROC of the CSVs read back.
    assert froc_evaluate([froc_inputs["tumour"], froc_inputs["normal"]], froc_inputs["masks"],
                         froc_inputs["root"] / "api") == metrics
    lesion = evaluation_mask(read_mask_level(froc_inputs["masks"] / "tumor_001.xml", slide_size=(8192, 8192)))
    dets = [read_detections_csv(out / "tumor_001.csv"), read_detections_csv(out / "normal_001.csv")]
    assert froc_score(dets, [lesion, None]).score == metrics["froc"]


def test_failed_froc_keeps_the_previous_files(froc_inputs, tmp_path, monkeypatch, disk_full, earlier_files):
    """The picture failing, written last, leaves the previous run's CSVs and metrics as they were,
    not new CSVs beside old metrics."""
    import wsitile.plots

    out = tmp_path / "f"
    before = earlier_files(out, ("froc.png", "metrics.json", "normal_001.csv", "tumor_001.csv"))
    monkeypatch.setattr(wsitile.plots, "save_froc", disk_full)
    with pytest.raises(OSError, match="No space left"):
        froc_evaluate([froc_inputs["tumour"], froc_inputs["normal"]], froc_inputs["masks"], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_froc_undefined_metrics_are_null(froc_inputs, tmp_path):
    metrics = froc_evaluate([froc_inputs["normal"]], froc_inputs["masks"], tmp_path)
    assert metrics == {"froc": None, "slide_auc": None}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_froc_bad_inputs_name_the_file(froc_inputs, tumour_slide, tmp_path, capsys):
    # A mask of another slide (8192 px) for the 4096 px normal slide.
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(tumour_slide["mask"], masks / "normal_001_mask.tif")
    code, out, err = run(["froc", froc_inputs["normal"], "--masks-dir", masks, "--out", tmp_path / "o"], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "normal_001_mask.tif: mask level-0 size 8192x8192 does not match slide" in err and "normal_001.tif" in err
    assert not (tmp_path / "o").exists()  # nothing written
    # An empty heatmap (no tissue windows).
    empty = tmp_path / "empty.npz"
    save_heatmap(empty, Heatmap(coords=np.zeros((0, 2), np.int64), probs=np.zeros(0, np.float32),
                                levels=np.array([2, 3]), window=80, center=50, stride=80, grid_shape=(25, 25),
                                slide=str(tumour_slide["slide"])))
    code, out, err = run(["froc", empty, "--masks-dir", masks, "--out", tmp_path / "o"], capsys)
    assert code == 1 and err.count("\n") == 1 and "empty.npz: heatmap has no windows" in err
    with pytest.raises(ValueError, match=r"empty\.npz"):
        froc_evaluate([empty], masks, tmp_path / "o")
    code, _, err = run(["froc", froc_inputs["normal"], "--masks-dir", tmp_path / "nowhere", "--out", tmp_path / "o"],
                       capsys)
    assert code == 1 and "nowhere: masks folder does not exist" in err
