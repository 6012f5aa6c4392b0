"""manifest.csv of a `wsitile synth` folder: (slide, label, split) rows, read defensively.

Slide names become paths to read (and predictions folders to write), so each must be a plain file
name inside the manifest's folder.
"""

from __future__ import annotations

from pathlib import Path


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a manifest.csv (slide, label, split). A slide name is used to build paths to read and
    write, so it must be a plain file name inside the manifest's folder: no separators, no '..'."""
    import csv

    rows = []
    with open(path, newline="") as fh:
        try:
            reader = csv.DictReader(fh)
            missing = {"slide", "label", "split"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
            table = list(reader)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a readable manifest ({exc})") from None
        for n, row in enumerate(table, start=2):
            name = row["slide"] or ""
            if (
                name in ("", ".", "..")
                or any(c in name for c in "/\\\0")
                or Path(name).name != name
                or Path(name).is_absolute()
            ):
                raise ValueError(f"{path}: line {n}: slide {name!r} is not a plain file name")
            if row["label"] not in ("tumor", "normal"):
                raise ValueError(f"{path}: line {n}: label {row['label']!r} is not 'tumor' or 'normal'")
            rows.append(row)
    return rows


def mask_for(slide: Path, masks_dir: Path) -> Path | None:
    """The Camelyon16 naming: ``<stem>_mask.tif`` or ``<stem>.xml`` in `masks_dir`; None for a normal slide."""
    for candidate in (masks_dir / f"{slide.stem}_mask.tif", masks_dir / f"{slide.stem}.xml"):
        if candidate.is_file():
            return candidate
    return None


def manifest_slides(folder: Path) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """(train, test) lists of (slide, mask or None) from `folder`/manifest.csv."""
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{folder}: no manifest.csv (make one with `wsitile synth`)")
    train: list[tuple[str, str | None]] = []
    test: list[tuple[str, str | None]] = []
    for row in read_manifest(manifest):
        slide = folder / row["slide"]
        mask = mask_for(slide, folder) if row["label"] == "tumor" else None
        if row["label"] == "tumor" and mask is None:
            raise FileNotFoundError(f"{manifest}: tumour slide {row['slide']} has no {slide.stem}_mask.tif or .xml")
        (test if row["split"] == "test" else train).append((str(slide), None if mask is None else str(mask)))
    return train, test
