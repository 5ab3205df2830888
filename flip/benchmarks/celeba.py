"""CelebA in the layout it is published in, read into (image path, 40 attributes, split) records.

The published files are easy to misread: `list_attr_celeba.txt` starts with an image-count
line and a header line of 40 names, and its values are right-aligned in 2-wide columns, so
the spacing between them varies (`000001.jpg -1  1  1 -1 ...`); `list_eval_partition.txt`
maps each file to 0 (train), 1 (val) or 2 (test). Users keep them either in the
`Anno/ Eval/ Img/img_align_celeba/` folders of the official download or all in one folder,
and both are found here. Any line that does not parse fails with the file, the line number
and what was expected, because a silently misaligned attribute column would poison every
downstream label; for the same reason the header must hold exactly CelebA's 40 names. An
image name that leads outside the image folder (`../`, an absolute path, a symlink out) is
skipped and counted as `path_outside_root`, never opened.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flip.benchmarks.base import OUTSIDE_ROOT, inside
from flip.data.shards import is_image_file

__all__ = [
    "CELEBA_ATTRIBUTES",
    "CELEBA_SPLITS",
    "CelebAFormatError",
    "CelebALayout",
    "CelebARecord",
    "check_attribute_names",
    "find_celeba",
    "read_attribute_file",
    "read_celeba",
    "read_partition_file",
]

# the 40 binary attributes, in the column order of list_attr_celeba.txt
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)
# list_eval_partition.txt codes, in order: 0 train (162,770), 1 val (19,867), 2 test (19,962)
CELEBA_SPLITS: tuple[str, ...] = ("train", "val", "test")

ATTRIBUTE_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
_VALUES = {"1": True, "-1": False, "0": False}
log = logging.getLogger(__name__)


class CelebAFormatError(ValueError):
    """A CelebA file that does not follow the published format; names file, line and expectation."""


@dataclass(frozen=True)
class CelebARecord:
    """One CelebA image: where it is, its 40 attributes as booleans, and its official split."""

    image: Path
    attributes: dict[str, bool]
    split: str

    @property
    def key(self) -> str:
        """The file stem (`000001`), unique within CelebA."""
        return self.image.stem


@dataclass(frozen=True)
class CelebALayout:
    """The three things a CelebA root must provide, wherever in it they were found."""

    root: Path
    attribute_file: Path
    partition_file: Path
    image_dir: Path


def _first_file(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / name for name in names if (root / name).is_file()), None)


def find_celeba(root: str | os.PathLike) -> CelebALayout:
    """Locates the attribute and partition files and the image folder under `root`.

    Accepts the official download (`Anno/list_attr_celeba.txt`, `Eval/list_eval_partition.txt`,
    `Img/img_align_celeba/`) and the flat variant where all three sit in `root` (the image
    folder may also be doubly nested, `img_align_celeba/img_align_celeba/`, as some archives
    unpack, or the `.jpg` files may lie in `root` itself).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CelebA root {str(root)!r} is not a folder")
    attr_names = [f"Anno/{ATTRIBUTE_FILE}", ATTRIBUTE_FILE]
    part_names = [f"Eval/{PARTITION_FILE}", PARTITION_FILE, f"Anno/{PARTITION_FILE}"]
    attribute_file = _first_file(root, attr_names)
    partition_file = _first_file(root, part_names)
    missing = [
        f"{what} (looked for {', '.join(names)})"
        for what, found, names in (
            (ATTRIBUTE_FILE, attribute_file, attr_names),
            (PARTITION_FILE, partition_file, part_names),
        )
        if found is None
    ]
    image_dirs = [
        root / "Img" / IMAGE_DIR,
        root / IMAGE_DIR / IMAGE_DIR,
        root / IMAGE_DIR,
        root / "Img" / IMAGE_DIR / IMAGE_DIR,
    ]
    image_dir = next((d for d in image_dirs if d.is_dir() and (d / "000001.jpg").is_file()), None)
    if image_dir is None:  # no 000001.jpg anywhere: take the first folder that exists
        image_dir = next((d for d in image_dirs if d.is_dir()), None)
    if image_dir is None and any(root.glob("*.jpg")):
        image_dir = root
    if image_dir is None:
        rel = ", ".join(str(d.relative_to(root)) + "/" for d in image_dirs[:3])
        missing.append(f"the image folder (looked for {rel} or .jpg files in the root)")
    if missing:
        raise FileNotFoundError(f"CelebA root {str(root)!r} lacks " + "; ".join(missing))
    return CelebALayout(root, attribute_file, partition_file, image_dir)


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    """(1-based line number, stripped text) of non-blank lines; tolerates a BOM and CRLF."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CelebAFormatError(f"{path}: not UTF-8/ASCII text ({exc.reason} at byte {exc.start})") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line.strip()


def read_attribute_file(path: str | os.PathLike) -> tuple[list[str], dict[str, dict[str, bool]]]:
    """Parses `list_attr_celeba.txt`: the attribute names and {file name: {attribute: bool}}.

    Values are 1 (True) and -1 (False); 0 is also read as False (some re-exports use 0/1).
    The count on line 1 must match the number of image lines.
    """
    path = Path(path)
    lines = iter(_lines(path))
    try:
        count_line, count_text = next(lines)
        header_line, header_text = next(lines)
    except StopIteration:
        raise CelebAFormatError(
            f"{path}: expected a count line and a header line of attribute names, got fewer than two lines"
        ) from None
    try:
        expected = int(count_text)
    except ValueError:
        raise CelebAFormatError(
            f"{path} line {count_line}: expected the number of images (an integer), got {count_text[:60]!r}"
        ) from None
    names = header_text.split()
    if len(set(names)) != len(names) or any(_looks_like_file(n) for n in names):
        raise CelebAFormatError(
            f"{path} line {header_line}: expected unique attribute names (e.g. '5_o_Clock_Shadow "
            f"Arched_Eyebrows ...'), got {header_text[:80]!r}"
        )
    check_attribute_names(names, path, header_line)
    records: dict[str, dict[str, bool]] = {}
    first_line: dict[str, int] = {}
    for number, text in lines:
        fields = text.split()
        file_name, values = fields[0], fields[1:]
        if len(values) != len(names):
            raise CelebAFormatError(
                f"{path} line {number}: expected a file name and {len(names)} values (1 or -1), "
                f"got {len(values)} values in {text[:80]!r}"
            )
        bad = next((v for v in values if v not in _VALUES), None)
        if bad is not None:
            column = names[values.index(bad)]
            raise CelebAFormatError(
                f"{path} line {number}: attribute {column} of {file_name} is {bad!r}; expected 1 or -1"
            )
        if file_name in records:
            raise CelebAFormatError(
                f"{path} line {number}: {file_name} is listed twice (first on line {first_line[file_name]})"
            )
        records[file_name] = {name: _VALUES[v] for name, v in zip(names, values, strict=True)}
        first_line[file_name] = number
    if len(records) != expected:
        raise CelebAFormatError(
            f"{path} line {count_line}: says {expected} images but the file lists {len(records)}; "
            "the file is truncated or the count line is wrong"
        )
    return names, records


def check_attribute_names(names: Sequence[str], path: str | os.PathLike, line: int) -> None:
    """Refuses a header that is not CelebA's 40 names (in any order): with `attr0 .. attr39` or a
    name missing, every image would get captions and labels from the wrong columns, or none."""
    missing = [n for n in CELEBA_ATTRIBUTES if n not in names]
    unknown = [n for n in names if n not in CELEBA_ATTRIBUTES]
    if missing or unknown:
        problems = []
        if missing:
            problems.append(
                f"missing {len(missing)}: {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}"
            )
        if unknown:
            problems.append(
                f"unknown {len(unknown)}: {', '.join(unknown[:12])}{' ...' if len(unknown) > 12 else ''}"
            )
        raise CelebAFormatError(
            f"{path} line {line}: the header is not CelebA's 40 attribute names ({'; '.join(problems)}); "
            f"expected the names {' '.join(CELEBA_ATTRIBUTES)}"
        )


def _looks_like_file(token: str) -> bool:
    return is_image_file(token)


def read_partition_file(path: str | os.PathLike) -> dict[str, str]:
    """Parses `list_eval_partition.txt` into {file name: 'train' | 'val' | 'test'}."""
    path = Path(path)
    splits: dict[str, str] = {}
    for number, text in _lines(path):
        fields = text.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise CelebAFormatError(
                f"{path} line {number}: expected '<file name> <0|1|2>' (0 train, 1 val, 2 test), "
                f"got {text[:80]!r}"
            )
        if fields[0] in splits:
            raise CelebAFormatError(f"{path} line {number}: {fields[0]} is listed twice")
        splits[fields[0]] = CELEBA_SPLITS[int(fields[1])]
    return splits


def read_celeba(
    root: str | os.PathLike,
    splits: str | Sequence[str] | None = None,
    require_images: bool = False,
    skipped: Counter[str] | None = None,
) -> list[CelebARecord]:
    """All CelebA records under `root` (see `find_celeba`), in the attribute file's order.

    `splits` keeps only those splits ('train', 'val', 'test'); `require_images` checks that
    every image file exists (one stat per image) and raises naming the first missing one.
    Images named outside the image folder are left out and counted into `skipped` by reason.
    """
    wanted = _check_splits(splits)
    layout = find_celeba(root)
    _, attributes = read_attribute_file(layout.attribute_file)
    partition = read_partition_file(layout.partition_file)
    records, outside = [], []
    for file_name, values in attributes.items():
        split = partition.get(file_name)
        if split is None:
            raise CelebAFormatError(
                f"{layout.partition_file}: no line for {file_name}, "
                f"which {layout.attribute_file.name} lists; "
                "the two files must cover the same images"
            )
        if split not in wanted:
            continue
        image = inside(layout.image_dir, file_name)
        if image is None:
            outside.append(file_name)
            continue
        records.append(CelebARecord(image, values, split))
    if outside:
        log.warning(
            "%s: skipped %d image name(s) leading outside %s, e.g. %r",
            layout.attribute_file,
            len(outside),
            layout.image_dir,
            outside[0],
        )
        if skipped is not None:
            skipped[OUTSIDE_ROOT] += len(outside)
    if require_images:
        missing = next((r.image for r in records if not r.image.is_file()), None)
        if missing is not None:
            raise FileNotFoundError(f"CelebA image {str(missing)!r} is listed but missing")
    return records


def _check_splits(splits: str | Sequence[str] | None) -> set[str]:
    if splits is None:
        return set(CELEBA_SPLITS)
    wanted = {splits} if isinstance(splits, str) else set(splits)
    unknown = wanted - set(CELEBA_SPLITS)
    if unknown:
        raise ValueError(f"unknown CelebA split(s) {sorted(unknown)}; accepted: {', '.join(CELEBA_SPLITS)}")
    return wanted
