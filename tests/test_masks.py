"""wsitile.masks: ASAP XML reading/writing, pixel-centre rasterisation, any_tumour, hostile input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.draw import polygon2mask

from wsitile import masks
from wsitile.masks import Annotations, any_tumour, rasterize, read_asap_xml, write_asap_xml


def _xml(annotations: list[tuple[str, list[tuple[float, float]]]], orders: list[list[int]] | None = None) -> str:
    """Camelyon16-style XML text: [(group, [(x, y), ...]), ...]."""
    parts = ['<?xml version="1.0"?>\n<ASAP_Annotations>\n\t<Annotations>']
    for i, (group, pts) in enumerate(annotations):
        parts.append(f'\t\t<Annotation Name="_{i}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">')
        parts.append("\t\t\t<Coordinates>")
        order = orders[i] if orders else list(range(len(pts)))
        for o, (x, y) in zip(order, pts):
            parts.append(f'\t\t\t\t<Coordinate Order="{o}" X="{x}" Y="{y}" />')
        parts.append("\t\t\t</Coordinates>\n\t\t</Annotation>")
    parts.append("\t</Annotations>\n\t<AnnotationGroups>")
    for g in ("_0", "_1", "_2"):
        parts.append(f'\t\t<Group Name="{g}" PartOfGroup="None" Color="#FF0000"><Attributes /></Group>')
    parts.append("\t</AnnotationGroups>\n</ASAP_Annotations>\n")
    return "\n".join(parts)


def _write(tmp_path, text: str | bytes, name: str = "a.xml"):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def _pixels(mask: np.ndarray, x0: int = 0, y0: int = 0) -> set[tuple[int, int]]:
    ys, xs = np.nonzero(mask)
    return {(int(x) + x0, int(y) + y0) for x, y in zip(xs, ys)}


# --- hand-worked pixel sets -----------------------------------------------------------------------


def test_square_pixel_centres(tmp_path):
    # Square [10, 20] x [5, 9]: pixel centres x + 0.5 in (10, 20) -> x = 10..19; y + 0.5 in (5, 9) -> 5..8.
    p = _write(tmp_path, _xml([("_0", [(10, 5), (20, 5), (20, 9), (10, 9)])]))
    ann = read_asap_xml(p)
    assert len(ann.tumour) == 1 and not ann.exclusion
    want = {(x, y) for x in range(10, 20) for y in range(5, 9)}
    assert _pixels(rasterize(ann, 0, 0, 32, 16)) == want
    # Any window gives the same pixels, in window coordinates.
    assert _pixels(rasterize(ann, 12, 6, 5, 5), 12, 6) == {(x, y) for (x, y) in want if 12 <= x < 17 and 6 <= y < 11}


def test_centres_on_edges_follow_top_left_rule(tmp_path):
    # Square [10.5, 13.5]^2: the centres x + 0.5 = 10.5 and 13.5 lie on its edges. A centre on the left
    # or top edge is inside, one on the right or bottom edge is not (polygons sharing an edge never
    # share a pixel): x, y in 10..12.
    ann = read_asap_xml(_write(tmp_path, _xml([("_0", [(10.5, 10.5), (13.5, 10.5), (13.5, 13.5), (10.5, 13.5)])])))
    assert _pixels(rasterize(ann, 0, 0, 20, 20)) == {(x, y) for x in range(10, 13) for y in range(10, 13)}


def test_triangle(tmp_path):
    # Triangle (0,0), (8,0), (0,8): centre inside iff (x + .5) + (y + .5) < 8, i.e. x + y <= 6.
    ann = read_asap_xml(_write(tmp_path, _xml([("_1", [(0, 0), (8, 0), (0, 8)])])))  # _1 is tumour
    want = {(x, y) for x in range(8) for y in range(8) if x + y <= 6}
    assert len(want) == 28
    assert _pixels(rasterize(ann, -3, -3, 16, 16), -3, -3) == want


def test_exclusion_hole_and_groups(tmp_path):
    text = _xml(
        [
            ("_0", [(0, 0), (10, 0), (10, 10), (0, 10)]),  # 100 pixels
            ("_2", [(3, 3), (6, 3), (6, 6), (3, 6)]),  # hole: x, y in 3..5
            ("Tumor", [(20, 0), (22, 0), (22, 2), (20, 2)]),  # other names are tumour
            ("EXCLUSION", [(20.4, 0.4), (20.6, 0.4), (20.6, 0.6), (20.4, 0.6)]),  # cuts pixel (20, 0)
        ]
    )
    ann = read_asap_xml(_write(tmp_path, text))
    assert len(ann.tumour) == 2 and len(ann.exclusion) == 2
    square = {(x, y) for x in range(10) for y in range(10)} - {(x, y) for x in range(3, 6) for y in range(3, 6)}
    small = {(20, 1), (21, 0), (21, 1)}
    got = _pixels(rasterize(ann, 0, 0, 30, 12))
    assert got == square | small
    assert len(got) == 91 + 3


def test_order_attribute_sorts_vertices(tmp_path):
    pts = [(10, 5), (20, 9), (20, 5), (10, 9)]  # document order is a bow tie; Order makes the square
    ann = read_asap_xml(_write(tmp_path, _xml([("_0", pts)], orders=[[0, 2, 1, 3]])))
    np.testing.assert_array_equal(ann.tumour[0], [(10, 5), (20, 5), (20, 9), (10, 9)])


def test_point_annotations_are_skipped(tmp_path):
    text = _xml([("_0", [(1, 1), (5, 1), (5, 5)])]).replace('Type="Polygon"', 'Type="Dot"')
    ann = read_asap_xml(_write(tmp_path, text))
    assert not ann.tumour and not ann.exclusion


# --- independent reference: skimage ----------------------------------------------------------------


def test_rasterize_matches_skimage_on_random_polygons():
    # skimage.draw.polygon tests integer points; shifting vertices by -0.5 makes them pixel centres.
    # With generic float vertices no centre lies exactly on an edge, so the rules must agree exactly.
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(3, 14))
        verts = rng.uniform(0.5, 60.0, (k, 2))  # self-intersecting ones included (even-odd rule)
        want = polygon2mask((64, 64), np.stack([verts[:, 1] - 0.5, verts[:, 0] - 0.5], axis=1))
        ann = Annotations(tumour=(verts,))
        np.testing.assert_array_equal(rasterize(ann, 0, 0, 64, 64), want)
        x0, y0, w, h = (int(v) for v in rng.integers(-10, 50, 4))
        w, h = abs(w), abs(h)
        full = np.zeros((200, 200), dtype=bool)
        full[50:114, 50:114] = want
        np.testing.assert_array_equal(rasterize(ann, x0, y0, w, h), full[50 + y0 : 50 + y0 + h, 50 + x0 : 50 + x0 + w])


def test_any_tumour_matches_rasterize():
    rng = np.random.default_rng(1)
    th = np.linspace(0, 2 * np.pi, 300, endpoint=False)
    blob = np.stack([3000 + 900 * np.cos(th) * (1 + 0.3 * np.sin(5 * th)), 2500 + 700 * np.sin(th)], axis=1) + 0.37
    hole = np.stack([3000 + 200 * np.cos(th), 2500 + 150 * np.sin(th)], axis=1) + 0.11
    speck = np.array([[6000.2, 100.7], [6003.9, 100.1], [6001.3, 104.4]])
    ann = Annotations(tumour=(blob, speck), exclusion=(hole,))
    xy = np.concatenate([rng.integers(1500, 4600, (3000, 2)), rng.integers(5990, 6010, (300, 2))])
    wh = rng.integers(1, 300, (len(xy), 2))
    rects = np.concatenate([xy, xy + wh], axis=1).astype(np.int64)
    got = any_tumour(ann, rects)
    want = np.array([rasterize(ann, x0, y0, x1 - x0, y1 - y0).any() for x0, y0, x1, y1 in rects.tolist()])
    np.testing.assert_array_equal(got, want)
    assert want[:3000].any() and not want[:3000].all()  # the test exercises both answers
    # A huge rect (cost follows the tumour, not the rect), one inside the hole, an empty one.
    special = np.array([[-(10**9), -(10**9), 10**9, 10**9], [2990, 2495, 3010, 2505], [5, 5, 5, 9]])
    np.testing.assert_array_equal(any_tumour(ann, special), [True, False, False])


def test_any_tumour_without_tumour_and_bad_shape():
    assert not any_tumour(Annotations(), np.array([[0, 0, 10, 10]])).any()
    assert any_tumour(Annotations(), np.zeros((0, 4), np.int64)).shape == (0,)
    with pytest.raises(ValueError):
        any_tumour(Annotations(), np.zeros((3, 3), np.int64))


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    ann = Annotations(
        tumour=(rng.uniform(0, 1e5, (50, 2)), np.array([[1.1, 2.2], [3.3, 4.4], [5.5, 0.1]])),
        exclusion=(rng.uniform(0, 1e5, (7, 2)),),
    )
    path = tmp_path / "out.xml"
    write_asap_xml(path, ann)
    back = read_asap_xml(path)
    assert len(back.tumour) == 2 and len(back.exclusion) == 1
    for a, b in zip(ann.tumour + ann.exclusion, back.tumour + back.exclusion):
        np.testing.assert_array_equal(a, b)  # exact: floats written with repr
    assert [p.name for p in tmp_path.iterdir()] == ["out.xml"]  # no temp file left behind


def test_annotations_validate():
    with pytest.raises(ValueError):
        Annotations(tumour=(np.zeros((2, 2)),))
    with pytest.raises(ValueError):
        Annotations(tumour=(np.array([[0, 0], [1, np.inf], [2, 0]]),))
    ann = Annotations(tumour=([[0, 0], [4, 0], [0, 4]],))
    assert ann.bbox() == (0, 0, 4, 4)
    assert Annotations().bbox() is None
    assert not ann.tumour[0].flags.writeable


# --- hostile input ------------------------------------------------------------------------------


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<ASAP_Annotations><Annotations><Annotation Name="&lol3;" PartOfGroup="_0"/></Annotations></ASAP_Annotations>
"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE foo [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<ASAP_Annotations><Annotations><Annotation Name="&xxe;" PartOfGroup="_0"/></Annotations></ASAP_Annotations>
"""


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("laughs.xml", BILLION_LAUGHS),
        ("xxe.xml", EXTERNAL_ENTITY),
        ("nan.xml", _xml([("_0", [(0, 0), ("nan", 1), (5, 5)])])),
        ("inf.xml", _xml([("_0", [(0, 0), (1, "-inf"), (5, 5)])])),
        ("word.xml", _xml([("_0", [(0, 0), ("twelve", 1), (5, 5)])])),
        ("underscore.xml", _xml([("_0", [(0, 0), ("1_000", 1), (5, 5)])])),  # Python's float() takes it
        ("arabic_digits.xml", _xml([("_0", [(0, 0), ("\u0661\u0662", 1), (5, 5)])])),  # so are these
        ("huge.xml", _xml([("_0", [(0, 0), (2.0**41, 1), (5, 5)])])),
        ("two.xml", _xml([("_0", [(0, 0), (1, 1)])])),
        ("order.xml", _xml([("_0", [(0, 0), (1, 1), (2, 0)])], orders=[[0, 1, "x"]])),  # type: ignore[list-item]
        ("malformed.xml", _xml([("_0", [(0, 0), (1, 1), (2, 0)])])[:-30]),
        ("other_root.xml", "<svg><polygon/></svg>"),
        ("empty.xml", ""),
        ("binary.xml", b"\x00\xff\xfe garbage"),
    ],
)
def test_bad_files_raise_value_error_naming_path(tmp_path, name, text):
    p = _write(tmp_path, text, name)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        read_asap_xml(p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.xml"
    with pytest.raises(FileNotFoundError, match="nope.xml"):
        read_asap_xml(p)


def test_coordinate_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(masks, "MAX_COORDINATES", 5)
    p = _write(tmp_path, _xml([("_0", [(0, 0), (1, 0), (1, 1)]), ("_0", [(0, 0), (1, 0), (1, 1)])]), "many.xml")
    with pytest.raises(ValueError, match=r"many\.xml.*more than 5"):
        read_asap_xml(p)


_XMLISH = st.lists(
    st.sampled_from(
        ["<ASAP_Annotations>", "</ASAP_Annotations>", "<Annotations>", "</Annotations>",
         '<Annotation PartOfGroup="_2" Type="Polygon">', "</Annotation>", "<Coordinates>", "</Coordinates>",
         '<Coordinate Order="0" X="1.5" Y="2" />', '<Coordinate Order="1" X="1e3" Y="7" />',
         '<Coordinate Order="2" X="-4" Y="nan" />', '<Coordinate Order="q" X="3" Y="3" />',
         '<!DOCTYPE a [<!ENTITY e "x">]>', "&e;", "&amp;", '<?xml version="1.0" encoding="latin-1"?>',
         '<?xml version="1.0" encoding="bogus"?>', "<", ">", '"', "\x00", "\xff"]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=200), _XMLISH.map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_fuzz_only_value_errors(tmp_path, data):
    p = tmp_path / "fuzz.xml"
    p.write_bytes(data)
    try:
        ann = read_asap_xml(p)
    except ValueError as exc:
        assert "fuzz.xml" in str(exc)
    else:
        rasterize(ann, 0, 0, 8, 8)
