"""Every reference to a document resolves, and the repository names no document it does not contain.

Scanned: the repository's text files, i.e. `git ls-files --cached --others --exclude-standard` (tracked files, plus
new ones git does not ignore, so a file is checked before its first commit; a walk of the tree without git) with the
suffixes .py .md .sh .toml .cpp .h .txt, outside .venv. This file is not scanned: it spells out the forms below.

The rules, each checked per line:

(a) Section references. "§N", "§N.M", ... name a numbered heading ("## N. Title", "### N.M Title") of
    docs/ALGORITHM.md; "§§N-M" / "§N–M" ranges and "§§N, M" lists name each end / each entry. Whatever follows the
    number is prose ("§4.2 a", "§1.2 step 3"). A reference written right after a Markdown file name, at most three
    non-word characters apart ("docs/TRAINING.md §2", "TRAINING.md, §2", "`<file>.md` (§2)"), names that file's
    numbered headings instead. Papers and outside sources are cited as "Sec. N", never with "§", so "§" always
    means an nftcore document.
(b) Titled references. A Markdown file name followed on the same line by a quoted title
    ("docs/TRAINING.md, \"Cached conditioning\"", "bench/RESULTS.md (\"Embedded demo\")") must name a heading of
    that file: the title, compared case-insensitively and without backticks or emphasis, occurs in one of its
    headings. A quoted title with no file name before it is not checked.
(c) Paths. A Markdown file named with a folder ("docs/<file>.md", "csrc/README.md") exists, from the repository root or
    from the citing file's folder (a relative link); a bare name ("RESULTS.md") is the name of some file of the
    repository. URLs are skipped.
(d) The repository stands on its own: no file names the design notes kept outside it (the STYLE, TARGETS,
    ENVIRONMENT and PEERS Markdown files, or the shared folder that holds them).

Headings are Markdown ATX headings outside fenced code blocks. docs/ALGORITHM.md's numbering is itself checked: no
number twice, and every "N.M" sits under an "N".
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()
ALGORITHM = "docs/ALGORITHM.md"
SUFFIXES = (".py", ".md", ".sh", ".toml", ".cpp", ".h", ".txt")
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", "runs"}

NUMBER = r"\d+(?:\.\d+)*"
SECTION = re.compile(rf"(§§?)\s*({NUMBER})((?:\s*(?:[-–,]|and)\s*{NUMBER})*)")
MORE_NUMBERS = re.compile(rf"(?:[-–,]|and)\s*({NUMBER})")
MD_NAME = r"[\w.-]*\w\.md"
MD_PATH = re.compile(rf"(?<![\w./-])((?:[\w.-]+/)*{MD_NAME})(?![\w/-])")
DOC_BEFORE = re.compile(rf"((?:[\w.-]+/)*{MD_NAME})\W{{0,3}}$")
TITLED = re.compile(rf"((?:[\w.-]+/)*{MD_NAME})`?\s*[,:(]?\s*[\"“]([^\"”]{{3,}})[\"”]")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
NUMBERED = re.compile(rf"^({NUMBER})\.?\s")
FENCE = re.compile(r"^\s*(```|~~~)")
FORBIDDEN = re.compile(r"\b(?:STYLE|TARGETS|ENVIRONMENT|PEERS)\.md\b|shared/docs\b")


@functools.cache
def repository_files() -> tuple[str, ...]:
    """Every file of the working tree git would commit (tracked + untracked, not ignored), as posix paths."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout.decode()
        names = {name for name in out.split("\0") if name}
    except (OSError, subprocess.SubprocessError):
        names = set()
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            names.update((Path(folder) / f).relative_to(ROOT).as_posix() for f in files)
    return tuple(sorted(n for n in names if (ROOT / n).is_file()))


@functools.cache
def scanned_files() -> tuple[str, ...]:
    return tuple(n for n in repository_files()
                 if n.endswith(SUFFIXES) and n != SELF and not any(p in SKIP_DIRS for p in n.split("/")[:-1]))


@functools.cache
def lines_of(name: str) -> tuple[str, ...]:
    return tuple((ROOT / name).read_text(encoding="utf-8", errors="replace").splitlines())


@functools.cache
def headings(name: str) -> tuple[str, ...]:
    """The ATX heading texts of Markdown file `name`, outside fenced code blocks."""
    found, fenced = [], False
    for line in lines_of(name):
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            found.append(match.group(1))
    return tuple(found)


def numbered_headings(name: str) -> dict[str, str]:
    """Section number -> heading text ("1.4" -> "1.4 Training timesteps ...")."""
    numbers = {}
    for text in headings(name):
        match = NUMBERED.match(text)
        if match:
            numbers.setdefault(match.group(1), text)
    return numbers


def resolve_markdown(name: str, citing: str) -> str | None:
    """The repository file a Markdown name in `citing` refers to (see (c) in the module docstring), or None."""
    folder = Path(citing).parent
    candidates = [Path(name), folder / name] if "/" in name else [folder / name, Path(name)]
    for candidate in candidates:
        path = os.path.normpath(candidate.as_posix())
        if (ROOT / path).is_file():
            return Path(path).as_posix()
    if "/" not in name:
        same_name = [f for f in repository_files() if f.rsplit("/", 1)[-1] == name]
        if same_name:
            return same_name[0]
    return None


def plain(text: str) -> str:
    return re.sub(r"[`*_]", "", text).casefold()


def where(name: str, number: int, line: str) -> str:
    return f"{name}:{number}: {line.strip()[:140]}"


def test_section_references_resolve():
    problems, count = [], 0
    for name in scanned_files():
        for number, line in enumerate(lines_of(name), 1):
            if "§" not in line:
                continue
            for match in SECTION.finditer(line):
                sections = [match.group(2)] + MORE_NUMBERS.findall(match.group(3))
                before = DOC_BEFORE.search(line[: match.start()])
                doc = resolve_markdown(before.group(1), name) if before else ALGORITHM
                if doc is None:
                    problems.append(f"{where(name, number, line)}\n    {match.group(0)!r}: {before.group(1)} does "
                                    "not exist")
                    continue
                known = numbered_headings(doc)
                for section in sections:
                    count += 1
                    if section not in known:
                        problems.append(f"{where(name, number, line)}\n    §{section} is not a numbered heading of "
                                        f"{doc}")
    assert count > 0, "found no § reference at all: is the scan broken?"
    assert not problems, f"{len(problems)} unresolved section reference(s):\n" + "\n".join(problems)


def test_titled_references_resolve():
    problems = []
    for name in scanned_files():
        for number, line in enumerate(lines_of(name), 1):
            if ".md" not in line:
                continue
            for match in TITLED.finditer(URL.sub(" ", line)):
                doc = resolve_markdown(match.group(1), name)
                if doc is None or not doc.endswith(".md"):
                    continue  # a missing file is test_markdown_paths_exist's report
                title = plain(match.group(2))
                if not any(title in plain(text) for text in headings(doc)):
                    problems.append(f"{where(name, number, line)}\n    {doc} has no heading containing "
                                    f"{match.group(2)!r}")
    assert not problems, f"{len(problems)} unresolved titled reference(s):\n" + "\n".join(problems)


def test_markdown_paths_exist():
    problems = []
    for name in scanned_files():
        for number, line in enumerate(lines_of(name), 1):
            if ".md" not in line:
                continue
            for match in MD_PATH.finditer(URL.sub(" ", line)):
                if resolve_markdown(match.group(1), name) is None:
                    problems.append(f"{where(name, number, line)}\n    {match.group(1)} does not exist in the "
                                    "repository")
    assert not problems, f"{len(problems)} missing document(s):\n" + "\n".join(problems)


def test_no_outside_documents_named():
    problems = [f"{where(name, number, line)}\n    names {m.group(0)!r}, which is not part of the repository"
                for name in scanned_files() for number, line in enumerate(lines_of(name), 1)
                for m in FORBIDDEN.finditer(line)]
    assert not problems, f"{len(problems)} mention(s) of outside documents:\n" + "\n".join(problems)


def test_algorithm_numbering_is_sound():
    numbers = [NUMBERED.match(text).group(1) for text in headings(ALGORITHM) if NUMBERED.match(text)]
    assert numbers, f"{ALGORITHM} has no numbered headings"
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    assert not repeated, f"{ALGORITHM}: section numbers used twice: {repeated}"
    orphans = [n for n in numbers if "." in n and n.rsplit(".", 1)[0] not in numbers]
    assert not orphans, f"{ALGORITHM}: sections without their parent heading: {orphans}"
