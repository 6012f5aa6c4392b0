"""The command line: subcommands, extract's .npz contract, and one-line errors that leave no file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest

import wsitile
from wsitile.cli import main


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "wsitile", "--help"], capture_output=True, text=True, check=True)
    for command in ("synth", "extract", "demo"):
        assert command in result.stdout
    version = subprocess.run([sys.executable, "-m", "wsitile", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"wsitile {wsitile.__version__}"


def test_extract_writes_the_contract(tumour_slide, tmp_path, capsys):
    out = tmp_path / "t.npz"
    code, stdout, _ = run(
        ["extract", tumour_slide["slide"], "--mask", tumour_slide["xml"], "--levels", 2, 3, "--window", 80,
         "--center", 50, "--stride", 80, "--save-images", "--threads", 2, "--out", out],
        capsys,
    )
    assert code == 0 and "windows" in stdout
    data = np.load(out, allow_pickle=False)
    grid = wsitile.build_grid(tumour_slide["slide"], tumour_slide["mask"])
    assert data["coords"].dtype == np.int64 and data["labels"].dtype == np.uint8
    np.testing.assert_array_equal(data["coords"], grid.coords)
    np.testing.assert_array_equal(data["labels"], grid.labels)
    assert data["labels"].sum() > 0
    np.testing.assert_array_equal(data["levels"], [2, 3])
    images = data["images"]
    assert images.shape == (len(grid), 2, 80, 80, 3) and images.dtype == np.uint8
    osr = openslide.OpenSlide(str(tumour_slide["slide"]))
    for k in np.random.default_rng(0).choice(len(grid), 5, replace=False):
        x, y = data["coords"][k]
        ref = np.asarray(osr.read_region((int(x), int(y)), 2, (80, 80)))[..., :3]
        np.testing.assert_array_equal(images[k, 0], ref)


def test_extract_without_mask_or_tissue_filter(normal_slide, tmp_path, capsys):
    out = tmp_path / "n.npz"
    code, _, _ = run(["extract", normal_slide, "--no-tissue-filter", "--out", out], capsys)
    assert code == 0
    data = np.load(out, allow_pickle=False)
    assert "images" not in data
    assert len(data["labels"]) == 12 * 12 and data["labels"].sum() == 0  # level 2 is 1024 px: 12 x 12 windows


def test_synth_cli(tmp_path, capsys):
    code, _, _ = run(["synth", tmp_path / "s", "--slides", 2, "--seed", 1, "--size", 1024], capsys)
    assert code == 0
    assert (tmp_path / "s" / "manifest.csv").read_text().splitlines()[0] == "slide,label,split"
    assert {p.name for p in (tmp_path / "s").glob("*.tif")} == {"tumor_001.tif", "tumor_001_mask.tif", "normal_001.tif"}


@pytest.fixture
def bad_inputs(tumour_slide, normal_slide, tmp_path):
    text = tmp_path / "notaslide.tif"
    text.write_text("hello")
    truncated = tmp_path / "truncated.tif"
    data = Path(tumour_slide["slide"]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    bad_xml = tmp_path / "bad.xml"
    bad_xml.write_text("<ASAP_Annotations><Annotations><Annotation")
    slide = tumour_slide["slide"]
    return {
        "missing slide": (["extract", tmp_path / "nope.tif"], "nope.tif"),
        "not a slide": (["extract", text], "notaslide.tif"),
        "truncated slide": (["extract", truncated, "--save-images"], "truncated.tif"),
        "level out of range": (["extract", slide, "--levels", 2, 9], "levels 0..4"),
        "window larger than level": (["extract", slide, "--levels", 4, "--window", 600], "window 600"),
        "center > window": (["extract", slide, "--center", 90], "center 90"),
        "stride < 1": (["extract", slide, "--stride", 0], "stride 0"),
        "threads < 1": (["extract", slide, "--threads", 0], "--threads: 0 is not >= 1"),
        "mask size mismatch": (["extract", slide, "--mask", normal_slide], "8192x8192"),
        "malformed xml": (["extract", slide, "--mask", bad_xml], "bad.xml"),
        "missing mask": (["extract", slide, "--mask", tmp_path / "nomask.tif"], "nomask.tif"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing slide", "not a slide", "truncated slide", "level out of range", "window larger than level",
     "center > window", "stride < 1", "threads < 1", "mask size mismatch", "malformed xml", "missing mask"],
)
def test_bad_input_is_one_line_and_no_file(case, bad_inputs, tmp_path, capsys):
    argv, needle = bad_inputs[case]
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, err = run([*argv, "--out", outdir / "x.npz"], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsitile extract: error:"), err
    assert needle in lines[0]
    assert list(outdir.iterdir()) == []  # neither the output nor a temporary file


def test_sparse_gigapixel_slide(tmp_path):
    """A slide whose level 0 exceeds 2^31 pixels: 64-bit coordinates through grid and loader."""
    from wsitile.synth import write_sparse_slide

    path = tmp_path / "sparse_001.tif"
    x0, y0, x1, y1 = write_sparse_slide(path, seed=0)
    slide = wsitile.Slide(path)
    width, height = slide.dimensions
    assert width * height > 2**31
    loader = wsitile.Loader([(path, None)], levels=(1, 2), window=64, stride=64, shuffle=False, threads=2)
    grid = loader.grids[0]
    assert len(grid) > 0
    # Only windows on the tissue patch survive the filter, far out in the slide.
    assert grid.coords[:, 0].min() >= x0 - 2 * 64 and grid.coords[:, 1].min() >= y0 - 2 * 64
    assert (grid.coords[:, 1].astype(np.int64) * width + grid.coords[:, 0]).max() > 2**31
    osr = openslide.OpenSlide(str(path))
    batch = next(iter(loader))
    for k in range(len(batch["labels"])):
        x, y = batch["coords"][k]
        ref = np.asarray(osr.read_region((int(x), int(y)), 1, (64, 64)))[..., :3]
        np.testing.assert_array_equal(batch["images"][k, 0], ref)
    loader.close()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_extract_refuses_images_beyond_memory_and_its_own_input(tumour_slide, tmp_path, capsys, monkeypatch):
    """--save-images that cannot fit in memory is one "out of memory" line before any window is cut
    (np.empty would not fail; the copies would, in the OOM killer); an --out that is the slide itself
    is refused rather than replaced."""
    import wsitile.masks

    monkeypatch.setattr(wsitile.masks, "available_memory", lambda: 1 << 20)
    code, _, err = run(["extract", tumour_slide["slide"], "--save-images", "--out", tmp_path / "x.npz"], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("wsitile extract: error: out of memory: --save-images:") and "GiB" in err, err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert wsitile.masks.available_memory() > 0  # this machine's /proc/meminfo

    slide = tmp_path / "slide.npz"  # a slide under a name that looks like an output
    slide.write_bytes(Path(tumour_slide["slide"]).read_bytes())
    before = slide.read_bytes()
    code, _, err = run(["extract", slide, "--out", slide], capsys)
    assert code == 1 and "the output is an input file" in err, err
    assert slide.read_bytes() == before
