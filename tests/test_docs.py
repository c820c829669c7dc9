"""The documents the repository points to are in the repository.

Code, docstrings, experiment comments and Markdown cite pages by name (``docs/objectives.md``) and often a section of
one (``docs/objectives.md, "kd"``). A clone must be able to follow every such reference, so each tracked text file is
read and:

- a path to a ``.md`` file (or a Markdown link to any local file) must name a file of the repository. A path whose
  first folder is not one of the repository's (``minillm/README.md``: a file of microsoft/LMOps) is another
  project's and is not checked; a path segment in capitals (``NAME``) or in angle brackets stands for any name;
- a bare file name (``<name>.md``) must be the name of a file somewhere in the repository;
- a page followed by a quoted section, ``<page>.md, "<section>"``, must have that section as a heading.

Only files read as text count (code, YAML, TOML, Markdown, templates, scripts), not result data (JSON, CSV, HTML).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh", ".j2", ".gitignore", ""}

# A path to a Markdown file, not inside a longer path or a URL (the character before it is none of these).
MD_PATH = re.compile(r"(?<![\w./:<>-])((?:\.{1,2}/)*(?:[\w.<>-]+/)*[\w.-]*\w\.md)\b")
# A Markdown link's target (before any #anchor).
LINK = re.compile(r"\]\((?!\w+:|#)([^)\s#]+)(?:#[^)\s]*)?\)")
# <page>.md, "<section>" (the page possibly closing a Markdown link or a code span; the section possibly wrapped over a
# comment line).
SECTION_REF = re.compile(r"((?:\.{1,2}/)*(?:[\w.-]+/)*[\w.-]*\w\.md)[`)]?,\s*([\"'])(.{1,120}?)\2", re.S)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*|<[^>]*>)$")


@dataclass
class Repository:
    root: Path
    files: frozenset[str]  # paths relative to the root, with "/"

    @cached_property
    def top_level(self) -> set[str]:
        return {name.split("/")[0] for name in self.files}

    @cached_property
    def folders(self) -> set[str]:
        return {name.rsplit("/", i)[0] for name in self.files for i in range(1, name.count("/") + 1)}

    def has(self, relative: str) -> bool:
        """Whether a normalised relative path is a file or folder of the repository (placeholder segments match any
        name)."""
        parts = relative.split("/")
        if not any(PLACEHOLDER.match(part) for part in parts):
            return relative in self.files or relative in self.folders
        pattern = "/".join("[^/]+" if PLACEHOLDER.match(part) else re.escape(part) for part in parts)
        return any(re.fullmatch(pattern, name) for name in self.files | self.folders)


def tracked_files(root: Path) -> frozenset[str]:
    """The files git tracks, and the new ones it does not ignore (so a page is found before it is committed)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return frozenset(name for name in listed.splitlines() if (root / name).is_file())


def normalised(base: str, target: str) -> str | None:
    """``target`` relative to the folder ``base`` (both relative to the root), or None when it leaves the root."""
    parts: list[str] = [p for p in base.split("/") if p]
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def resolve(repo: Repository, source: str, target: str) -> str | None:
    """The repository path a reference in ``source`` names, None when it names no file of the repository, and ""
    when it is another project's path (not checked)."""
    folder = source.rsplit("/", 1)[0] if "/" in source else ""
    if "/" not in target:  # a bare name: the file beside the source, else a file of that name anywhere
        beside = normalised(folder, target)
        return beside if beside in repo.files else next((f for f in sorted(repo.files) if f.rsplit("/", 1)[-1] == target), None)
    candidates = [normalised(folder, target)]
    if not target.startswith("."):
        if target.split("/")[0] not in repo.top_level and not repo.has(candidates[0] or ""):
            return ""
        candidates.append(normalised("", target))
    return next((c for c in candidates if c is not None and repo.has(c)), None)


def headings(text: str) -> set[str]:
    """The section titles of a Markdown page, code spans unquoted; lines inside code fences are not headings."""
    found, fenced = set(), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := HEADING.match(line)):
            found.add(match.group(1).replace("`", ""))
    return found


def broken_references(repo: Repository, source: str, text: str) -> list[str]:
    """Every reference in ``text`` (the content of ``source``) that a clone of ``repo`` cannot follow, as messages."""
    problems: list[str] = []
    if ".md" not in text and "](" not in text:
        return problems
    targets = {m.group(1) for m in MD_PATH.finditer(text)}
    if source.endswith(".md"):
        targets |= {m.group(1) for m in LINK.finditer(text)}
    for target in sorted(targets):
        if resolve(repo, source, target) is None:
            problems.append(f"{source}: {target} is not a file of the repository")
    for match in SECTION_REF.finditer(text):
        page, section = match.group(1), re.sub(r"\s*\n\s*(?:#\s*)?", " ", match.group(3)).replace("`", "")
        resolved = resolve(repo, source, page)
        if resolved and resolved.endswith(".md") and section not in headings((repo.root / resolved).read_text()):
            problems.append(f'{source}: {page} has no section "{section}"')
    return problems


# Broken references in files another branch is rewriting, reported there; remove an entry once its fix is merged.
def text_files(repo: Repository) -> list[str]:
    return sorted(name for name in repo.files if Path(name).suffix in TEXT_SUFFIXES)


@pytest.fixture(scope="module")
def repo() -> Repository:
    return Repository(ROOT, tracked_files(ROOT))


def test_every_referenced_document_and_section_exists(repo: Repository) -> None:
    """No tracked text file cites a page that is not in the repository, or a section its page does not have."""
    problems = [problem for name in text_files(repo)
                for problem in broken_references(repo, name, (ROOT / name).read_text(errors="replace"))]
    assert not problems, "\n".join(problems)


def test_the_project_pages_are_linked_from_the_readme(repo: Repository) -> None:
    """Each page under docs/ is reachable from the README, where a user starts."""
    readme = (ROOT / "README.md").read_text()
    linked = {resolve(repo, "README.md", m.group(1)) for m in LINK.finditer(readme)}
    pages = {name for name in repo.files if name.startswith("docs/") and name.endswith(".md")}
    assert pages <= linked, f"not linked from README.md: {sorted(pages - linked)}"


# Negative controls: each reference below is broken in one way, so the check above can fail. (The file names are
# put together at run time, so that this file holds no broken reference itself.)
MISSING_PAGE = "docs/" + "no-such-page" + ".md"
MISSING_BARE = "NO_SUCH_NOTES" + ".md"
OBJECTIVES, PROTOCOLS = "docs/objectives" + ".md", "docs/protocols" + ".md"
EXAMPLE = "docs/example" + ".md"  # where the texts below are read from


@pytest.mark.parametrize("text, expected", [
    (f"See {MISSING_PAGE}.", f"{MISSING_PAGE} is not a file"),
    (f"# as in {MISSING_BARE}, table", f"{MISSING_BARE} is not a file"),
    ("[the page](" + "../docs/" + "gone" + ".md)", "../docs/" + "gone" + ".md is not a file"),
    (f'{OBJECTIVES}, "No such section"', f'{OBJECTIVES} has no section "No such section"'),
    (f'({PROTOCOLS}, "The released\n# recipe")', 'has no section "The released recipe"'),
], ids=["missing page", "missing bare name", "broken link", "missing section", "wrapped section"])
def test_a_broken_reference_is_reported(repo: Repository, text: str, expected: str) -> None:
    problems = broken_references(repo, EXAMPLE, text)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("text", [
    f'{OBJECTIVES}, "kd"',  # a section that exists
    "[kd](objectives" + ".md), the page beside it",
    f"({PROTOCOLS}, 'The released\n# recipes')",  # wrapped over a comment line
    "`minillm/README.md:188` in microsoft/LMOps",  # another project's file
    "results/reference/NAME/leaderboard.md",  # a placeholder
    "https://github.com/microsoft/LMOps/blob/main/minillm/README.md",
], ids=["section", "relative link", "wrapped", "other project", "placeholder", "url"])
def test_a_valid_reference_is_accepted(repo: Repository, text: str) -> None:
    assert broken_references(repo, EXAMPLE, text) == []
