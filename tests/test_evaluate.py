"""Window-level evaluation (`wsitile evaluate`), the heatmap.npz contract and the plots."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pytest
from PIL import Image
from sklearn.metrics import precision_score, recall_score, roc_auc_score, roc_curve

import wsitile
from wsitile.cli import main
from wsitile.evaluate import METRIC_KEYS, evaluate_heatmap, format_table, window_labels, window_metrics
from wsitile.heatmap import Heatmap, base_downsample, grid_cells, grid_image, load_heatmap, save_heatmap
from wsitile.plots import heatmap_backdrop, save_heatmap_png, save_roc, save_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def noisy_probs(labels, seed=0, noise=0.12):
    rng = np.random.default_rng(seed)
    return np.clip(0.2 + 0.55 * labels + rng.normal(0, noise, len(labels)), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def tumour_grid(tumour_slide):
    return wsitile.build_grid(tumour_slide["slide"], tumour_slide["mask"])


@pytest.fixture(scope="module")
def tumour_heatmap(tumour_grid, tmp_path_factory):
    path = tmp_path_factory.mktemp("heatmap") / "heatmap.npz"
    save_heatmap(path, Heatmap.from_grid(tumour_grid, noisy_probs(tumour_grid.labels)))
    return path


# --------------------------------------------------------------------------------------------------
# window_metrics


def test_window_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    labels = (rng.uniform(size=500) < 0.2).astype(np.uint8)
    probs = np.round(np.clip(0.35 * labels + rng.uniform(0, 0.7, 500), 0, 1), 2)  # rounded: ties
    m = window_metrics(labels, probs)
    assert tuple(m) == METRIC_KEYS
    # Independently: J over every distinct probability as threshold (prob >= t is tumour).
    best_j, best_t = -1.0, None
    for t in np.unique(probs)[::-1]:  # decreasing: the first maximum is the highest threshold
        pred = probs >= t
        j = pred[labels == 1].mean() - pred[labels == 0].mean()
        if j > best_j:
            best_j, best_t = j, t
    fpr, tpr, thr = roc_curve(labels, probs)
    assert m["threshold"] == best_t == thr[np.argmax(tpr - fpr)]
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-15)
    pred = probs >= best_t
    assert m["sensitivity"] == pytest.approx(pred[labels == 1].mean())
    assert m["specificity"] == pytest.approx(1 - pred[labels == 0].mean())
    assert m["sensitivity"] - (1 - m["specificity"]) == pytest.approx(best_j)
    assert m["recall"] == pytest.approx(recall_score(labels, probs >= 0.5))
    assert m["precision"] == pytest.approx(precision_score(labels, probs >= 0.5))
    assert (m["n_windows"], m["n_tumour"]) == (500, int(labels.sum()))


def test_seed_like_recall_below_sensitivity():
    # 10 tumour windows: 9 at 0.9, one at 0.49; 20 normal: 19 at 0.1, one at 0.6.
    # J at 0.9: TPR 0.9 - FPR 0 = 0.90; at 0.6: 0.9 - 0.05 = 0.85; at 0.49: 1.0 - 0.05 = 0.95 (best);
    # at 0.1: 1 - 1 = 0. So threshold 0.49, sensitivity 1, specificity 0.95; at 0.5 the 0.49 window
    # is missed: recall 0.9 (< sensitivity, as the seed's 0.97277 < 0.97478), precision 9/10.
    # AUC: the 9 high tumour windows beat all 20 normals, the 0.49 one beats 19: 199/200.
    labels = np.array([1] * 10 + [0] * 20)
    probs = np.array([0.9] * 9 + [0.49] + [0.1] * 19 + [0.6], dtype=np.float32)
    m = window_metrics(labels, probs)
    assert m["threshold"] == pytest.approx(0.49) and m["threshold"] < 0.5
    assert m["sensitivity"] == 1.0 and m["specificity"] == pytest.approx(0.95)
    assert m["recall"] == pytest.approx(0.9) and m["recall"] < m["sensitivity"]
    assert m["precision"] == pytest.approx(0.9)
    assert m["auc"] == pytest.approx(199 / 200)
    table = format_table(m)
    assert "threshold" in table and "0.49000" in table and "n_windows" in table


def test_window_metrics_chance_model_has_a_finite_threshold():
    # Inverted scores: J is largest (0) at sklearn's "nothing is tumour" point (threshold inf).
    m = window_metrics(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9]))
    assert np.isfinite(m["threshold"]) and m["threshold"] > 0.9
    assert (m["sensitivity"], m["specificity"], m["auc"]) == (0.0, 1.0, 0.0)
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize("labels", [np.zeros(5), np.ones(5)])
def test_window_metrics_one_class_is_an_error(labels):
    with pytest.raises(ValueError, match="AUC is undefined"):
        window_metrics(labels.astype(np.uint8), np.linspace(0, 1, 5))


# --------------------------------------------------------------------------------------------------
# heatmap.npz


def test_heatmap_round_trip_and_grid_image(tumour_grid, tumour_heatmap):
    hm = load_heatmap(tumour_heatmap)
    with np.load(tumour_heatmap, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(["coords", "probs", "levels", "window", "center", "stride",
                                             "grid_shape", "slide"])
        assert data["coords"].dtype == np.int64 and data["probs"].dtype == np.float32
        assert data["grid_shape"].dtype == np.int64 and data["stride"].dtype == np.int64
        assert str(data["slide"]) == str(tumour_grid.slide)
    np.testing.assert_array_equal(hm.coords, tumour_grid.coords)
    assert base_downsample(hm) == tumour_grid.downsamples[0]
    image = grid_image(hm)
    assert image.shape == tumour_grid.grid_shape and image.dtype == np.float32
    cols, rows = (tumour_grid.xy // tumour_grid.stride).T
    np.testing.assert_array_equal(image[rows, cols], hm.probs)
    assert np.isnan(image).sum() == image.size - len(hm)


def test_downsample_from_coordinates_when_the_slide_is_gone():
    # Inexact downsample (as real slides have): recovered from the coordinates alone. They bound it to
    # +-1/2 px over at most 49 steps of 80 (+-1.3e-4); the simplest decimal in that range is 4.0003.
    d0 = 4.0003
    rows, cols = 40, 50
    jj, ii = np.divmod(np.arange(rows * cols), cols)
    keep = np.random.default_rng(2).uniform(size=ii.size) < 0.6
    xy = np.stack([ii[keep] * 80, jj[keep] * 80], axis=1)
    hm = Heatmap(coords=np.rint(xy * d0).astype(np.int64), probs=np.full(keep.sum(), 0.5, np.float32),
                 levels=np.array([2, 3]), window=80, center=50, stride=80, grid_shape=(rows, cols),
                 slide="/nowhere/gone.tif")
    assert base_downsample(hm) == d0
    row, col = grid_cells(hm)
    np.testing.assert_array_equal(col * 80, xy[:, 0])
    np.testing.assert_array_equal(row * 80, xy[:, 1])


def test_bad_heatmap_files_are_named(tmp_path, tumour_grid):
    good = Heatmap.from_grid(tumour_grid, noisy_probs(tumour_grid.labels)).arrays()
    missing = tmp_path / "missing.npz"
    np.savez(missing, **{k: v for k, v in good.items() if k != "probs"})
    with pytest.raises(ValueError, match=r"missing\.npz.*missing probs"):
        load_heatmap(missing)
    bad_shape = tmp_path / "shape.npz"
    np.savez(bad_shape, **{**good, "probs": good["probs"][:-1]})
    with pytest.raises(ValueError, match=r"shape\.npz: probs"):
        load_heatmap(bad_shape)
    out_of_range = tmp_path / "range.npz"
    np.savez(out_of_range, **{**good, "probs": good["probs"] + 2})
    with pytest.raises(ValueError, match=r"range\.npz: probs must be finite probabilities"):
        load_heatmap(out_of_range)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=r"garbage\.npz"):
        load_heatmap(garbage)
    with pytest.raises(FileNotFoundError, match="absent"):
        load_heatmap(tmp_path / "absent.npz")
    with pytest.raises(TypeError, match="missing fields"):
        save_heatmap(tmp_path / "x.npz", coords=good["coords"])


def test_heatmap_sizes_beyond_any_slide_are_refused(tmp_path, tumour_grid, tumour_slide, monkeypatch):
    """A window, stride or coordinate past 2**40, or a grid of more than 2**40 cells, is refused
    (2**62 used to overflow into coordinates of -2**63 and wrong messages), and an evaluation whose
    picture fails writes nothing: not a ROC beside an earlier run's metrics.json."""
    good = Heatmap.from_grid(tumour_grid, noisy_probs(tumour_grid.labels)).arrays()
    for key, value, needle in (("window", np.int64(2**62), "window must be in"),
                               ("stride", np.int64(2**41), "stride must be in"),
                               ("grid_shape", np.array([2**62, 2**62]), "grid_shape .* has more than 2\\*\\*40 cells"),
                               ("coords", good["coords"] + 2**41, "coords must be level-0 pixels")):
        path = tmp_path / f"{key}.npz"
        np.savez(path, **{**good, key: value})
        with pytest.raises(ValueError, match=f"{key}\\.npz: {needle}"):
            load_heatmap(path)
    import wsitile.plots

    def fail(*args, **kwargs):
        raise MemoryError("Unable to allocate 364 TiB")

    heatmap = tmp_path / "h.npz"
    save_heatmap(heatmap, Heatmap.from_grid(tumour_grid, noisy_probs(tumour_grid.labels)))
    monkeypatch.setattr(wsitile.plots, "grid_image", fail)
    out = tmp_path / "eval"
    with pytest.raises(MemoryError):
        evaluate_heatmap(heatmap, tumour_slide["xml"], out)
    assert not out.exists() or list(out.iterdir()) == []


def test_save_heatmap_from_fields_is_atomic(tmp_path, tumour_grid):
    probs = noisy_probs(tumour_grid.labels)
    path = tmp_path / "h.npz"
    save_heatmap(path, coords=tumour_grid.coords, probs=probs, levels=np.array(tumour_grid.levels),
                 window=np.int64(80), center=np.int64(50), stride=np.int64(80),
                 grid_shape=np.array(tumour_grid.grid_shape), slide=str(tumour_grid.slide))
    assert [p.name for p in tmp_path.iterdir()] == ["h.npz"]  # no temporary file left behind
    np.testing.assert_array_equal(load_heatmap(path).probs, probs)


# --------------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_end_to_end(tumour_slide, tumour_grid, tumour_heatmap, tmp_path):
    out = tmp_path / "eval"
    metrics = evaluate_heatmap(tumour_heatmap, tumour_slide["xml"], out)
    expected = window_metrics(tumour_grid.labels, load_heatmap(tumour_heatmap).probs)
    assert metrics == expected
    assert metrics["n_tumour"] == int(tumour_grid.labels.sum()) > 0
    assert metrics["auc"] > 0.9
    on_disk = json.loads((out / "metrics.json").read_text())
    assert list(on_disk) == list(METRIC_KEYS) and on_disk == metrics
    assert sorted(p.name for p in out.iterdir()) == ["heatmap_vs_truth.png", "metrics.json", "roc.png"]
    assert_png(out / "roc.png")
    assert_png(out / "heatmap_vs_truth.png")
    # The mask TIFF labels exactly as the XML does.
    assert evaluate_heatmap(tumour_heatmap, tumour_slide["mask"], tmp_path / "eval_tif") == metrics


def test_failed_evaluation_keeps_the_previous_files(tumour_slide, tumour_heatmap, tmp_path, monkeypatch, disk_full,
                                                    earlier_files):
    """The third file failing (metrics.json) leaves the previous evaluation's three files as they
    were, not new pictures beside old metrics."""
    import wsitile.evaluate

    out = tmp_path / "eval"
    before = earlier_files(out, ("heatmap_vs_truth.png", "metrics.json", "roc.png"))
    monkeypatch.setattr(wsitile.evaluate, "write_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        evaluate_heatmap(tumour_heatmap, tumour_slide["mask"], out, threads=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_window_labels_follow_the_engine_with_overlapping_windows(tumour_slide):
    grid = wsitile.build_grid(tumour_slide["slide"], tumour_slide["xml"], stride=40)
    hm = Heatmap.from_grid(grid, np.zeros(len(grid), np.float32))
    np.testing.assert_array_equal(window_labels(hm, tumour_slide["mask"]), grid.labels)
    np.testing.assert_array_equal(window_labels(hm, tumour_slide["xml"]), grid.labels)


def test_cli_evaluate(tumour_slide, tumour_heatmap, tmp_path, capsys):
    code, out, err = run(["evaluate", tumour_heatmap, "--mask", tumour_slide["mask"], "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    for key in METRIC_KEYS:
        assert key in out
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["n_windows"] > 0


@pytest.mark.parametrize("mask_key", ["mask", "xml"])
def test_heatmap_and_mask_of_different_slides(normal_slide, tumour_slide, tmp_path, capsys, mask_key):
    grid = wsitile.build_grid(normal_slide)
    hm_path = tmp_path / "normal.npz"
    save_heatmap(hm_path, Heatmap.from_grid(grid, noisy_probs(grid.labels)))
    mask = tumour_slide[mask_key]
    with pytest.raises(ValueError) as info:
        evaluate_heatmap(hm_path, mask, tmp_path / "o")
    assert str(mask) in str(info.value) and str(normal_slide) in str(info.value)
    code, out, err = run(["evaluate", hm_path, "--mask", mask, "--out", tmp_path / "o"], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("wsitile evaluate: error:") and str(mask) in err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_empty_heatmap_is_an_error(tumour_slide, tumour_grid, tmp_path, capsys):
    path = tmp_path / "empty.npz"
    save_heatmap(path, Heatmap(coords=np.zeros((0, 2), np.int64), probs=np.zeros(0, np.float32),
                               levels=np.array([2, 3]), window=80, center=50, stride=80,
                               grid_shape=tumour_grid.grid_shape, slide=str(tumour_slide["slide"])))
    with pytest.raises(ValueError, match=r"empty\.npz: heatmap has no windows"):
        evaluate_heatmap(path, tumour_slide["mask"], tmp_path / "o")
    code, _, err = run(["evaluate", path, "--mask", tumour_slide["mask"], "--out", tmp_path / "o"], capsys)
    assert code == 1 and "empty.npz" in err and err.count("\n") == 1


def test_all_normal_windows_is_an_error_naming_the_file(tumour_slide, tumour_grid, tmp_path):
    normal = tumour_grid.labels == 0
    path = tmp_path / "normal_only.npz"
    save_heatmap(path, Heatmap(coords=tumour_grid.coords[normal], probs=np.full(normal.sum(), 0.3, np.float32),
                               levels=np.array([2, 3]), window=80, center=50, stride=80,
                               grid_shape=tumour_grid.grid_shape, slide=str(tumour_slide["slide"])))
    with pytest.raises(ValueError, match=r"normal_only\.npz.*AUC is undefined: all \d+ windows are normal"):
        evaluate_heatmap(path, tumour_slide["xml"], tmp_path / "o")


def test_heatmap_off_the_slides_grid_is_an_error(tumour_slide, tumour_grid, tmp_path):
    hm = Heatmap.from_grid(tumour_grid, noisy_probs(tumour_grid.labels))
    shifted = Heatmap(coords=hm.coords + 3, probs=hm.probs, levels=hm.levels, window=80, center=50, stride=80,
                      grid_shape=hm.grid_shape, slide=hm.slide, path="shifted.npz")
    with pytest.raises(ValueError, match=r"shifted\.npz: window at level-0 .* is not on the grid"):
        window_labels(shifted, tumour_slide["mask"])


# --------------------------------------------------------------------------------------------------
# plots


def test_plots_write_valid_pngs(tumour_slide, tumour_heatmap, tmp_path):
    hm = load_heatmap(tumour_heatmap)
    save_heatmap_png(hm, tumour_slide["slide"], tmp_path / "heatmap.png")
    assert_png(tmp_path / "heatmap.png")
    save_roc(np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.3, 0.6]), tmp_path / "roc.png", threshold=0.6)
    assert_png(tmp_path / "roc.png")
    history = {"step": [10, 20, 30], "loss": [0.9, 0.5, 0.4], "val_step": [15, 30], "val_auc": [0.8, 0.93],
               "pairs_per_s": [100.0, 110.0, 105.0]}
    save_training_curves(history, tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")
    save_training_curves({"step": [], "loss": []}, tmp_path / "empty.png")  # an empty history still draws
    assert_png(tmp_path / "empty.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "empty.png", "heatmap.png", "roc.png"]


def test_a_lone_hot_window_shows_however_fine_the_grid(tumour_slide, tmp_path):
    """A grid far finer than the picture (1,024 windows across ~430 px, as a Camelyon-size slide's
    ~600 in the same width): one window of probability 1 among 0s changes the picture wherever it
    is, the slide's edge included, in heatmap.png and in the heatmap panels of heatmap_vs_truth.png
    (imshow's nearest-neighbour resampling dropped it about 2 times in 3: the picture is max-pooled to
    its pixels; at the edge the axes' frame covered it: the images are drawn over the frame)."""
    from wsitile.plots import save_heatmap_vs_truth

    width, height = openslide.OpenSlide(tumour_slide["slide"]).dimensions
    cols, rows = width // 8, height // 8
    rng = np.random.default_rng(5)
    cells = rng.choice(rows * cols, size=4, replace=False)
    cells[:2] = (0, cols * 100)  # the top-left corner and the left edge: not hidden under the axes' frame
    coords = np.stack([cells % cols * 8, cells // cols * 8], axis=1).astype(np.int64)
    backdrop = heatmap_backdrop(tumour_slide["slide"])

    def pictures(probs):
        hm = Heatmap(coords=coords, probs=np.asarray(probs, np.float32), levels=np.array([0]), window=8, center=4,
                     stride=8, grid_shape=(rows, cols), slide=str(tumour_slide["slide"]))
        save_heatmap_png(hm, tumour_slide["slide"], tmp_path / "h.png", backdrop=backdrop)
        save_heatmap_vs_truth(hm, tumour_slide["mask"], tmp_path / "v.png")
        return [np.asarray(Image.open(tmp_path / name).convert("RGB"), np.int16) for name in ("h.png", "v.png")]

    cold = pictures(np.zeros(4))
    for hot in range(4):
        for before, after in zip(cold, pictures(np.eye(4)[hot])):
            assert before.shape == after.shape and (np.abs(after - before).sum(-1) > 60).any(), hot


def test_heatmap_png_from_a_prepared_backdrop_is_the_same_picture(tumour_slide, tumour_heatmap, tmp_path):
    # predict reads the backdrop in a thread during its loop; the picture must not depend on it.
    hm = load_heatmap(tumour_heatmap)
    backdrop = heatmap_backdrop(tumour_slide["slide"])
    ref = openslide.OpenSlide(tumour_slide["slide"])
    level = next((i for i, d in enumerate(ref.level_dimensions) if max(d) <= 2048), ref.level_count - 1)
    expected = np.asarray(ref.read_region((0, 0), level, ref.level_dimensions[level]).convert("RGB"))
    np.testing.assert_array_equal(backdrop.thumbnail, expected)
    assert backdrop.dimensions == ref.dimensions
    save_heatmap_png(hm, tumour_slide["slide"], tmp_path / "own.png")
    save_heatmap_png(hm, tumour_slide["slide"], tmp_path / "prepared.png", backdrop=backdrop)
    own, prepared = (np.asarray(Image.open(tmp_path / name)) for name in ("own.png", "prepared.png"))
    np.testing.assert_array_equal(own, prepared)
    bad = Heatmap(coords=hm.coords, probs=hm.probs, levels=np.array([9, 10]), window=hm.window, center=hm.center,
                  stride=hm.stride, grid_shape=hm.grid_shape, slide=hm.slide)
    with pytest.raises(ValueError, match=r"level 9 out of range.*levels 0\.\."):
        save_heatmap_png(bad, tumour_slide["slide"], tmp_path / "bad.png", backdrop=backdrop)
    assert not (tmp_path / "bad.png").exists()
