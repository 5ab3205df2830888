"""The README's map of the repository is true, and the docs' links lead somewhere.

A newcomer finds code from the map: every path it names must exist, and every folder of the
library, the configs, the entry points and the benchmarks must have its line, so a moved or
added folder fails here until the map says where it went. Links between README.md, docs/ and
bench/README.md are checked too: the file must exist, and a #heading must be one of its headings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .helpers import ROOT

README = ROOT / "README.md"
MAP_HEADING = "## Map of the repository"
# every folder under these has its own line in the map; the others are listed as a whole
MAPPED_TREES = ("flip", "conf", "eval", "bench")
ALSO_MAPPED = ("tests", "docker", "docs")
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def map_entries() -> list[tuple[int, str]]:
    """(README line, path) for each path a map line names: the code spans before its dash."""
    lines = README.read_text().splitlines()
    assert MAP_HEADING in lines, f"README.md has no {MAP_HEADING!r} section"
    start = lines.index(MAP_HEADING)
    entries = []
    for number, line in enumerate(lines[start + 1 :], start + 2):
        if line.startswith("## "):
            break
        if line.startswith("- `"):
            named, dash, _ = line.partition(" — ")
            assert dash, f"README.md:{number}: a map line is '- `path` — what it holds': {line!r}"
            entries += [(number, path) for path in re.findall(r"`([^`]+)`", named)]
    return entries


def _folders(top: str) -> list[str]:
    """The folders of a tree that hold something of the project (no caches, no hidden folders)."""
    found = [f"{top}/"]
    for path in sorted((ROOT / top).rglob("*")):
        parts = path.relative_to(ROOT).parts
        if path.is_dir() and not any(p.startswith((".", "__")) or p.endswith(".egg-info") for p in parts):
            found.append("/".join(parts) + "/")
    return found


def test_every_path_in_the_map_exists():
    entries = map_entries()
    assert len(entries) >= 20, f"the map names only {len(entries)} paths"
    missing = [
        f"README.md:{number}: {path}"
        for number, path in entries
        if not (ROOT / path).exists() or (path.endswith("/") and not (ROOT / path).is_dir())
    ]
    assert not missing, "the README's map names paths that do not exist:\n" + "\n".join(missing)


def test_every_folder_has_a_line_in_the_map():
    mapped = {path for _, path in map_entries()}
    folders = [f for top in MAPPED_TREES for f in _folders(top)] + [f"{top}/" for top in ALSO_MAPPED]
    unmapped = [folder for folder in folders if folder not in mapped]
    assert not unmapped, "folders without a line in the README's map: " + ", ".join(unmapped)


def test_every_module_in_the_data_flow_picture_exists():
    text = README.read_text()
    picture = re.search(r"^## Data flow\n.*?^```\n(.*?)^```", text, flags=re.M | re.S)
    assert picture, "README.md has no '## Data flow' picture"
    paths = re.findall(r"\b(flip/[\w/]*\w(?:\.py)?/?)", picture.group(1))
    files = re.findall(r"(?<![\w/])(\w+\.py)\b", picture.group(1))  # named without their folder
    assert len(paths) >= 8 and files, "the data flow picture names too few modules to be a map"
    missing = [path for path in paths if not (ROOT / path).exists()]
    python_files = {f.name for f in ROOT.rglob("*.py") if ".venv" not in f.parts}
    missing += [name for name in files if name not in python_files]
    assert not missing, "the data flow picture names modules that do not exist: " + ", ".join(missing)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _headings(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)  # no '#' lines of code
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def _links(path: Path) -> list[tuple[int, str]]:
    out, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            out += [(number, target) for target in re.findall(r"\]\(([^)\s]+)\)", line)]
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_to_a_file_and_heading_that_exist(doc):
    broken = []
    for number, target in _links(doc):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (doc.parent / file).resolve() if file else doc
        where = f"{doc.relative_to(ROOT)}:{number}: {target}"
        if not linked.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _headings(linked):
            broken.append(f"{where} (no heading #{anchor} in {linked.relative_to(ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_docs_pages_exist_and_the_readme_links_each():
    readme = README.read_text()
    for page in ("data", "training", "evaluation", "models"):
        assert (ROOT / "docs" / f"{page}.md").is_file(), f"docs/{page}.md is missing"
        assert f"(docs/{page}.md)" in readme, f"README.md does not link docs/{page}.md"
