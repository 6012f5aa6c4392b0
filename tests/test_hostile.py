"""Hostile input (RELIABILITY.md): fuzzed engine parameters, hostile XML, pickle, paths from files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wsitile
from wsitile import _core
from wsitile.masks import read_asap_xml
from wsitile.synth import write_slide

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> str:
    """A 1024 px slide: levels 0 (1024 px) and 1 (512 px); any grid on it is at most 1M windows."""
    path = tmp_path_factory.mktemp("hostile") / "small.tif"
    write_slide(path, 1024, seed=3, tumour=False)
    return str(path)


# Values a careless or hostile caller may pass where a size or count is expected.
_WEIRD = st.one_of(
    st.integers(min_value=-3, max_value=1100),
    st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**32 + 80, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([None, True, False, "80", b"80", 80.0, [80], (), np.int64(80), np.uint8(7), np.float32(3)]),
)
_LEVELS = st.one_of(
    st.lists(_WEIRD, max_size=4),
    st.tuples(st.integers(-2, 3), st.integers(-2, 3)),
    st.sampled_from([None, 2, "01", (0, 0), (1, 0), (0, 1), [0], np.array([0, 1])]),
)
_ALLOWED = (ValueError, TypeError)


_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "levels": _LEVELS,
        "window": _WEIRD,
        "center": _WEIRD,
        "stride": _WEIRD,
        "threads": _WEIRD,
        "tissue_threshold": st.one_of(st.none(), st.floats(allow_nan=True), st.sampled_from([0, 1, 2, "x", True])),
    },
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=_PARAMS)
def test_fuzz_build_grid_parameters(small_slide, params):
    """build_grid with any parameters: a Grid, or ValueError / TypeError - never another exception,
    a crash or a hang."""
    try:
        grid = wsitile.build_grid(small_slide, **params)
    except _ALLOWED:
        return
    assert grid.xy.dtype == np.int64 and len(grid.xy) == len(grid.labels) <= 1024 * 1024


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    params=_PARAMS,
    loader=st.fixed_dictionaries(
        {},
        optional={
            "batch_size": _WEIRD,
            "seed": _WEIRD,
            "cache_mb": _WEIRD,
            "tile_cache_mb": _WEIRD,
            "out_dtype": st.sampled_from(["uint8", "float32", "inception", "float64", "", None, 3]),
            "on_error": st.sampled_from(["raise", "skip", "ignore", None, 1]),
            "augment": st.sampled_from([False, True, None, 1, "yes"]),
        },
    ),
)
def test_fuzz_loader_parameters(small_slide, params, loader):
    """Loader with any parameters: ValueError / TypeError, or a loader whose first batch (when small
    enough to allocate here) has the asked shape."""
    try:
        ld = wsitile.Loader([(small_slide, None)], **params, **loader)
    except _ALLOWED:
        return
    with ld:
        n = min(ld.batch_size, ld.num_samples)
        if n * len(ld.levels) * ld.window**2 * 3 * 4 <= 32 << 20:
            batch = next(iter(ld))
            assert batch["images"].shape == (n, len(ld.levels), ld.window, ld.window, 3)


@settings(max_examples=200, deadline=None)
@given(
    x=st.integers(-(2**63), 2**63 - 1),
    y=st.integers(-(2**63), 2**63 - 1),
    window=st.sampled_from([1, 80, 2**16, 2**16 + 1, 2**40]),
    batch_size=st.sampled_from([1, 64, 2**40, 2**62]),
    threads=st.sampled_from([1, 2, 1025, -1]),
    slide_index=st.sampled_from([0, 1, -1, 2**31 - 1]),
)
def test_fuzz_core_loader_sample_table(tumour_slide, x, y, window, batch_size, threads, slide_index):
    """The extension's own checks (for callers that bypass the Python layer): coordinates anywhere
    in int64, absurd windows, batches or thread counts are ValueError, never overflow or a crash."""
    args = dict(
        slides=[str(tumour_slide["slide"])],
        slide_index=np.array([slide_index], np.int32),
        x=np.array([x], np.int64),
        y=np.array([y], np.int64),
        labels=np.zeros(1, np.uint8),
        levels=[2, 3],
        window=window,
        batch_size=batch_size,
        threads=threads,
        shuffle=False,
        balanced=False,
        drop_last=False,
        seed=0,
        cache_bytes=0,
    )
    try:
        loader = _core.Loader(**args)
    except ValueError:
        return
    assert max(abs(x), abs(y)) * 8 <= 2**40 and window <= 2**16 and slide_index == 0  # level 3: d = 8
    if window <= 80:
        batch = loader.next()  # far outside the slide: white, not a crash
        assert batch["images"].shape == (1, 2, window, window, 3)
    loader.close()


def test_core_loader_mismatched_columns(tumour_slide):
    with pytest.raises(ValueError, match="length"):
        _core.Loader(
            [str(tumour_slide["slide"])], np.zeros(2, np.int32), np.zeros(1, np.int64), np.zeros(2, np.int64),
            np.zeros(2, np.uint8), [2, 3], 80, 4, 1, False, False, False, 0, 0,
        )


@pytest.mark.parametrize(
    "location, size",
    [((0, 0), (2**31, 2**31)), ((2**62, 0), (8, 8)), ((-(2**63), 0), (8, 8)), ((0, 0), (0, 5)), ((0, 0), (-1, 5))],
)
def test_slide_read_region_bounds(small_slide, location, size):
    slide = wsitile.Slide(small_slide)
    with pytest.raises(ValueError):
        slide.read_region(location, 0, size)


# ---- hostile XML beyond tests/test_masks.py -------------------------------------------------------

HOSTILE_XML = {
    "external_dtd.xml": '<?xml version="1.0"?><!DOCTYPE ASAP_Annotations SYSTEM "http://127.0.0.1:9/x.dtd">'
    "<ASAP_Annotations/>",
    "parameter_entity.xml": '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>'
    "<ASAP_Annotations/>",
    "quadratic.xml": '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "' + "A" * 100_000 + '">]><ASAP_Annotations>'
    + "&x;" * 1000 + "</ASAP_Annotations>",
    "deep.xml": "<ASAP_Annotations>" + "<a>" * 200_000 + "</a>" * 200_000 + "</ASAP_Annotations>",
    "unclosed_deep.xml": "<ASAP_Annotations>" + "<a>" * 200_000,
    "utf16_garbage.xml": b"\xff\xfe" + "<ASAP_Annotations>".encode("utf-16-le") + b"\x00\xd8\x00",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_XML))
def test_hostile_xml_value_error_naming_file(tmp_path, name):
    text = HOSTILE_XML[name]
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    try:
        ann = read_asap_xml(path)
    except ValueError as exc:
        assert name in str(exc)
        assert "root:" not in str(exc)  # nothing of /etc/passwd ever reaches a message
    else:  # only the harmless deep nesting may parse, and it holds no polygon
        assert name == "deep.xml" and not ann.tumour and not ann.exclusion


def test_xml_memory_is_proportional_to_coordinates(tmp_path):
    """One polygon of 100,000 vertices: parsing allocates tens of bytes per coordinate (compact arrays,
    elements dropped as read), not the ~800 bytes an element tree keeps - so the MAX_COORDINATES cap
    (10 million) also bounds memory to about half a gigabyte."""
    import tracemalloc

    n = 100_000
    path = tmp_path / "many.xml"
    with open(path, "w") as fh:
        fh.write('<ASAP_Annotations><Annotations><Annotation Name="a" PartOfGroup="_0"><Coordinates>')
        fh.writelines(f'<Coordinate Order="{n - i}" X="{i * 0.5}" Y="{i % 977}.25" />' for i in range(n))
        fh.write("</Coordinates></Annotation></Annotations></ASAP_Annotations>")
    tracemalloc.start()
    try:
        ann = read_asap_xml(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ann.tumour[0].shape == (n, 2) and ann.tumour[0][0, 0] == (n - 1) * 0.5  # sorted by Order
    assert peak < 100 * n, f"{peak / n:.0f} bytes per coordinate"


# ---- no pickle, no writes outside the output folder ----------------------------------------------


def test_no_pickle_where_files_are_read():
    """np.load always with allow_pickle=False; no pickle / marshal / shelve / torch.load / eval."""
    sources = [p for d in ("python", "models", "tests", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py")]
    assert sources
    bad = []
    for path in sources:
        if path.name == "test_hostile.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\bnp\.load\(", code) and "allow_pickle=False" not in code:
                bad.append(f"{path}:{n}: {line.strip()}")
            if re.search(r"\b(import pickle|from pickle|cPickle|import marshal|import shelve|torch\.load|joblib\.load|\beval\()", code):
                bad.append(f"{path}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_manifest_names_cannot_escape(tmp_path):
    """The demo reads slide names from manifest.csv: a name that is a path (../x, /abs, a/b) is
    refused with one line naming the manifest, and nothing is written outside the output folder."""
    from wsitile import manifest as cli

    out = tmp_path / "demo"
    slides = out / "slides"
    slides.mkdir(parents=True)
    (slides / "manifest.csv").write_text("slide,label,split\n../../evil.tif,tumor,train\n")
    with pytest.raises(ValueError, match=r"manifest\.csv.*evil\.tif"):
        cli.read_manifest(slides / "manifest.csv")
    for name in ("/etc/passwd", "a/b.tif", "..", ".", "", "x\0.tif", "..\\x.tif"):
        (slides / "manifest.csv").write_text(f"slide,label,split\n{name},normal,train\n")
        with pytest.raises(ValueError, match="manifest"):
            cli.read_manifest(slides / "manifest.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_cli_bad_numbers_one_line(small_slide, tmp_path):
    """CLI: hostile numbers end in one error line on stderr and a non-zero exit (2 for what argparse
    refuses, 1 for the library), never a traceback, a hang (NaN time limits never ran out) or files."""
    out = str(tmp_path / "o.npz")
    run, demo = str(tmp_path / "run"), str(tmp_path / "demo")
    for args in (
        ["extract", small_slide, "--out", out, "--window", "1e999"],
        ["extract", small_slide, "--out", out, "--levels", "0", "--stride", str(2**70)],
        ["extract", small_slide, "--out", out, "--levels", "0", "--window", str(-(2**63))],
        ["extract", small_slide, "--out", out, "--levels", "0", "--threads", str(10**6)],
        ["extract", small_slide, "--out", out, "--levels", "0", "--tissue-threshold", "-1"],  # was "no filter"
        ["synth", str(tmp_path / "s"), "--size", "-5"],
        ["train", str(tmp_path), "--out", run, "--time-limit", "nan"],
        ["train", str(tmp_path), "--out", run, "--time-limit", "-5"],
        ["train", str(tmp_path), "--out", run, "--width", "inf"],
        ["froc", out, "--masks-dir", str(tmp_path), "--out", str(tmp_path / "f"), "--nms-radius", "inf"],
        ["demo", "--out", demo, "--train-seconds", "nan"],
        ["demo", "--out", demo, "--threads", "0"],
        ["demo", "--out", demo, "--size", "2048"],  # no levels 2 and 3: refused before the slides are made
        ["demo", "--out", demo, "--slides", "3"],
    ):
        proc = subprocess.run([sys.executable, "-m", "wsitile", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode in (1, 2), (args, proc)
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stderr.startswith(f"wsitile {args[0]}: error:"), (args, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
