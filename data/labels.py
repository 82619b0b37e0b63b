"""Labels files: a folder of images plus one file that names each image's formula.

The two layouts published handwritten and printed sets use:

- ``NAME<TAB>formula`` (CROHME and most sets), NAME with or without its extension;
- ``NAME formula-index`` plus a formula file, one formula a line, indices from 0 (im2markup).

Like the NAME2ID mode (data/custom.py), every problem (malformed line, missing image, duplicate
name) is collected with its file and line number and the rest is still usable: a 10,000-line
file with three bad lines should build, and say which three.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from data.custom import CustomDataError, Labelled, LabelReport, clean_formula
from data.image import IMAGE_SUFFIXES
from data.layout import read_lines
from data.normalize import NormalizeError


def _read_text_lines(path: Path, what: str) -> list[str]:
    """Lines split on `\\n` only (data.layout.read_lines), without a leading byte-order mark,
    which spreadsheet exports add and which would otherwise become part of the first name."""
    if not path.is_file():
        raise CustomDataError(f"{what} {path}: file not found")
    lines = read_lines(path)
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    return lines


class ImageIndex:
    """The image files under a folder, found by relative path or by path without extension.

    Listed once, so that looking up thousands of names does not stat the folder per name, and
    so that an extension is matched whatever its case (`a.PNG` for the name `a`)."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise CustomDataError(f"--images {root}: folder not found")
        self.root = root
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        for f in sorted(root.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                rel = f.relative_to(root).as_posix()
                self.by_name[rel] = f
                self.by_stem[rel[:-len(f.suffix)]].append(f)

    def find(self, name: str) -> Path:
        """The image a labels file calls `name`; ValueError (a skippable problem) if none or
        several match."""
        name = name.replace("\\", "/").removeprefix("./")
        if name in self.by_name:
            return self.by_name[name]
        found = self.by_stem.get(name, [])
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(f.name for f in found)
            raise ValueError(f"image {name!r} is ambiguous in {self.root} ({names})")
        raise ValueError(f"image {name!r} not found in {self.root}")


def _parse_line(line: str, formulas: list[str] | None) -> tuple[str, str]:
    """(name, raw formula) of one line; ValueError with what was expected."""
    if formulas is None:
        name, sep, formula = line.partition("\t")
        if not sep or not name.strip() or not formula.strip():
            raise ValueError(f"expected 'NAME<TAB>FORMULA', got {line[:80]!r}")
        return name.strip(), formula.strip()
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"expected 'NAME FORMULA_INDEX', got {line[:80]!r}")
    idx = int(parts[1])
    if idx >= len(formulas) or not formulas[idx].strip():
        raise ValueError(f"formula index {idx} is out of range or empty (the formula file has "
                         f"{len(formulas)} lines)")
    return parts[0], formulas[idx].strip()


def read_labels(labels: str | Path, images: str | Path,
                formulas: str | Path | None = None) -> LabelReport:
    """Every labelled image of a labels file, with its cleaned formula (data.custom.clean_formula).

    Malformed lines, names without an image, ambiguous names and names (or files) labelled twice
    are reported as `FILE:LINE: why` and skipped; the first label of an image wins."""
    labels = Path(labels)
    lines = _read_text_lines(labels, "--labels")
    if not any(ln.strip() for ln in lines):
        raise CustomDataError(f"--labels {labels}: empty file")
    formula_lines = None if formulas is None else _read_text_lines(Path(formulas), "--formulas")
    index = ImageIndex(Path(images))
    report = LabelReport()
    first_line: dict[Path, int] = {}
    for lineno, line in enumerate(lines, start=1):
        where = f"{labels}:{lineno}"
        if not line.strip():
            continue
        try:
            name, raw = _parse_line(line, formula_lines)
            image = index.find(name)
        except ValueError as e:
            report.problems.append(f"{where}: {e}")
            continue
        if image in first_line:
            report.problems.append(f"{where}: duplicate: {name!r} is already labelled on line "
                                   f"{first_line[image]}")
            continue
        first_line[image] = lineno
        try:
            formula, restored = clean_formula(raw)
        except NormalizeError as e:
            report.problems.append(f"{where}: formula unusable: {e}")
            continue
        report.restored += restored
        report.labelled.append(Labelled(image, formula, where))
    return report

