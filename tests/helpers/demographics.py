"""UTKFace and FairFace written by tests in their published layouts: file names carry UTKFace's
labels, CSVs beside the image folders carry FairFace's. Colours follow gender and race, so a
probe on a tiny model has something to find."""

from __future__ import annotations

from flip.benchmarks.fairface import FAIRFACE_RACES

from .images import write_image

# (age, gender, race) of the well-formed names; the date field makes each name unique
UTK_WELL_FORMED = [
    (a, i % 2, i % 5)
    for i, a in enumerate([1, 2, 5, 9, 15, 23, 31, 38, 44, 52, 61, 66, 70, 85, 116, 0, 27, 33, 48, 19])
]
# the published folder's kinds of malformed names, and one of each out-of-range value
UTK_MALFORMED = {
    "39_1_20170116174525125.jpg.chip.jpg": "race_missing",
    "24_0_1_20170116220224657 .jpg.chip.jpg": "space_in_name",
    "55_0_0_20170116232725357jpg.chip.jpg": "missing_dot",
    "117_0_0_20170116232725358.jpg.chip.jpg": "age_out_of_range",
    "30_2_0_20170116232725359.jpg.chip.jpg": "gender_out_of_range",
    "30_0_5_20170116232725360.jpg.chip.jpg": "race_out_of_range",
    "holiday_photo.jpg": "unrecognised_name",
}


def utk_name(i: int, age: int, gender: int, race: int) -> str:
    return f"{age}_{gender}_{race}_2017011617{i:07d}.jpg.chip.jpg"


def write_utkface(folder, well_formed=UTK_WELL_FORMED, malformed=UTK_MALFORMED):
    """UTKFace/ as published: one folder of named JPEGs (colour: gender and race, for probes)."""
    for i, (age, gender, race) in enumerate(well_formed):
        write_image(
            folder / utk_name(i, age, gender, race), (40 + 170 * gender, 50 * race, 2 * age), (20, 20)
        )
    for name in malformed:
        write_image(folder / name, (0, 0, 0), (20, 20))
    (folder / "README.txt").write_text("not an image\n")
    return folder


FAIRFACE_ROWS = {
    "train": [
        ("train/1.jpg", "50-59", "Male", "East Asian"),
        ("train/2.jpg", "30-39", "Female", "Indian"),
        ("train/3.jpg", "3-9", "Female", "Black"),
        ("train/4.jpg", "more than 70", "Male", "Latino_Hispanic"),
        ("../../outside.jpg", "20-29", "Male", "White"),
    ],
    "val": [
        ("val/1.jpg", "0-2", "Female", "Middle Eastern"),
        ("val/2.jpg", "20-29", "Male", "Southeast Asian"),
        ("val/3.jpg", "10-19", "Female", "White"),
    ],
}


def write_fairface(root, paddings=("025", "125"), rows=FAIRFACE_ROWS):
    """The published layout: two label CSVs beside the image folder(s) of each padding."""
    for split, entries in rows.items():
        lines = ["file,age,gender,race,service_test"]
        lines += [f"{f},{a},{g},{r},True" for f, a, g, r in entries]
        (root / f"fairface_label_{split}.csv").parent.mkdir(parents=True, exist_ok=True)
        (root / f"fairface_label_{split}.csv").write_text("\n".join(lines) + "\n")
        for padding in paddings:
            for i, (f, _, gender, race) in enumerate(entries):
                if not f.startswith(".."):
                    colour = (40 + 170 * (gender == "Female"), 30 * FAIRFACE_RACES.index(race), 20 * i)
                    write_image(root / f"fairface-img-margin{padding}-trainval" / f, colour, (20, 20))
    return root
