"""Custom labelled data: NAME2ID + ID2FORMULA.json + a folder per answer type, and answer keys.

An answer key's formulas are respelled in one place, `clean_formula` (dropped backslashes,
plain-text symbols), whether they label training images (jerry_preprocess.py, data/labels.py)
or are the expected answers of inference.py (`--answer`, `--answer_key`: `load_answer_key`),
so a reading is checked against the same spelling the model was trained on.

The original helper `eval()`ed its keys and command-line strings; here every input is parsed as
data (JSON, and keys matched by a regular expression), and every problem is collected with the
file it concerns so that one bad folder or key does not stop a build.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from data.image import IMAGE_SUFFIXES
from data.normalize import NormalizeError, normalize, restore_backslashes

KEY = re.compile(r"^\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)$")
ITEM = re.compile(r"^(\d+)(?:_|$)")


class CustomDataError(ValueError):
    """An input file that cannot be used at all (missing, malformed JSON, wrong shape)."""


@dataclass
class Labelled:
    image: Path
    formula: str
    key: str  # "(GROUP,ITEM)", for messages


@dataclass
class LabelReport:
    labelled: list[Labelled] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    restored: int = 0  # formulas whose dropped backslashes were put back


def _load_json(path: str | Path, what: str) -> object:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise CustomDataError(f"{what} {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CustomDataError(f"{what} {path}: malformed JSON: {e}") from None


def load_name2id(path: str | Path) -> dict[str, int]:
    """Folder name (or path) -> group id."""
    d = _load_json(path, "NAME2ID")
    if not isinstance(d, dict):
        raise CustomDataError(f"NAME2ID {path}: expected a JSON object {{\"folder\": id, ...}}")
    out = {}
    for name, gid in d.items():
        if isinstance(gid, bool) or not isinstance(gid, int):
            raise CustomDataError(f"NAME2ID {path}: the id of {name!r} is {gid!r}, not an "
                                  "integer")
        out[str(name)] = gid
    return out


def load_id2formula(path: str | Path) -> dict[tuple[int, int], str]:
    """`(GROUP,ITEM)` -> formula, from a list of groups (or one object) of such keys."""
    d = _load_json(path, "ID2FORMULA")
    groups = d if isinstance(d, list) else [d]
    out: dict[tuple[int, int], str] = {}
    for g, group in enumerate(groups):
        if not isinstance(group, dict):
            raise CustomDataError(f"ID2FORMULA {path}: group {g} is not a JSON object")
        for key, formula in group.items():
            m = KEY.match(key)
            if not m:
                raise CustomDataError(f"ID2FORMULA {path}: key {key!r} is not of the form "
                                      "\"(GROUP,ITEM)\"")
            if not isinstance(formula, str):
                raise CustomDataError(f"ID2FORMULA {path}: the formula of {key} is not a string")
            out[(int(m[1]), int(m[2]))] = formula
    return out


# Plain-text spellings that the answer keys use for symbols (see ../shared/data/custom_example):
# `{{ x | x <= 2 }}` is the set {x | x <= 2}, `inf` is infinity.
ANSWER_KEY_SPELLINGS = {"{{": "\\{", "}}": "\\}", "inf": "\\infty", "<=": "\\leq",
                        ">=": "\\geq"}


def answer_key_tokens(tokens: list[str]) -> list[str]:
    """Answer-key spellings to LaTeX, and `U` to `\\cup` where it joins two intervals
    (`( - inf , 2 ) U [ 3 , inf )`); a `U` anywhere else stays a letter."""
    out = [ANSWER_KEY_SPELLINGS.get(t, t) for t in tokens]
    for i in range(1, len(out) - 1):
        if out[i] == "U" and out[i - 1][-1:] in ")]" and out[i + 1][:1] in "([":
            out[i] = "\\cup"
    return out


def clean_formula(formula: str) -> tuple[str, bool]:
    """Normalized formula, and whether it was respelled: dropped backslashes restored
    (`frac { 1 } { 3 }` -> `\\frac { 1 } { 3 }`) and answer-key spellings mapped, since a
    model trained on the rendered IM2LATEX form would otherwise have two spellings of one
    symbol."""
    tokens = formula.split()
    fixed = restore_backslashes(answer_key_tokens(tokens))
    return normalize(" ".join(fixed)), fixed != tokens


def load_answer_key(path: str | Path) -> dict[str, str]:
    """Name -> expected formula, respelled by `clean_formula`. Names are image file names or
    folder names, so one key can hold an answer per exam question (folder) and exceptions per
    sheet (image). Raises CustomDataError naming the file and what is wrong with it."""
    key = _load_json(path, "answer key")
    if not isinstance(key, dict) or not all(isinstance(v, str) for v in key.values()):
        raise CustomDataError(f'answer key {path}: expected {{"NAME": "LATEX", ...}}')
    try:
        return {str(name): clean_formula(formula)[0] for name, formula in key.items()}
    except NormalizeError as e:
        raise CustomDataError(f"answer key {path}: {e}") from None


def find_folder(root: Path, name: str) -> Path | None:
    for cand in (root / name, Path(name)):
        if cand.is_dir():
            return cand
    return None


def label_images(images_root: str | Path, name2id: dict[str, int],
                 id2formula: dict[tuple[int, int], str]) -> LabelReport:
    """Pair every image under the NAME2ID folders with its formula.

    An image `ITEM_anything.png` in folder F is labelled `ID2FORMULA[(NAME2ID[F], ITEM)]`.
    Folders under the root that NAME2ID does not name, names whose folder is missing or whose
    group has no formulas, file names without an item number and keys without a formula are
    reported, not fatal."""
    root = Path(images_root)
    if not root.is_dir():
        raise CustomDataError(f"--images {root}: folder not found")
    report = LabelReport()
    groups = {g for g, _ in id2formula}
    used = set()
    for name, gid in name2id.items():
        folder = find_folder(root, name)
        if folder is None:
            report.problems.append(f"NAME2ID: folder {name!r} not found under {root}")
            continue
        used.add(folder.resolve())
        if gid not in groups:
            report.problems.append(f"NAME2ID: {name!r} maps to group {gid}, which has no "
                                   "formulas in ID2FORMULA")
            continue
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            report.problems.append(f"{folder}: no images")
        for f in files:
            m = ITEM.match(f.stem)
            if not m:
                report.problems.append(f"{f}: name does not start with an item number "
                                       "(ITEM_anything.png)")
                continue
            key = (gid, int(m[1]))
            if key not in id2formula:
                report.problems.append(f"{f}: no formula for key \"({gid},{key[1]})\"")
                continue
            try:
                formula, restored = clean_formula(id2formula[key])
            except NormalizeError as e:
                report.problems.append(f"{f}: formula \"({gid},{key[1]})\" unusable: {e}")
                continue
            report.restored += restored
            report.labelled.append(Labelled(f, formula, f"({gid},{key[1]})"))
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if d.resolve() not in used:
            report.problems.append(f"{d}: folder not in NAME2ID, skipped")
    return report
