"""The documentation's links resolve: every relative link in README.md and docs/*.md points to an
existing file (and heading anchor), and every `docs/<page>.md#<anchor>` the code cites exists.
Plain text only: no jax, no model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages written in other branches; a link to one is checked once it exists.
CODE_DIRS = ("lminf_jax", "models", "convert", "scripts", "tests")
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)")
CITATION = re.compile(r"\bdocs/([\w.-]+\.md)(#[\w-]+)?")


def _fence_flags(lines):
  """(line, whether it is part of a fenced code block, fences included)."""
  fenced = False
  for line in lines:
    if line.lstrip().startswith("```"):
      fenced = not fenced
      yield line, True
    else:
      yield line, fenced


def prose(text: str, code_spans: bool = False) -> str:
  """The text with fenced code blocks blanked, and inline code spans dropped unless `code_spans`
  (a heading's `code` is part of its anchor)."""
  return "\n".join("" if fenced else line if code_spans else re.sub(r"`[^`]*`", "", line)
                   for line, fenced in _fence_flags(text.splitlines()))


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
  seen: dict[str, int] = {}
  out = set()
  for match in re.finditer(r"^#{1,6} +(.+?) *#*$", prose(page.read_text(), code_spans=True), re.M):
    base = slug(match.group(1))
    n = seen.get(base, 0)
    seen[base] = n + 1
    out.add(base if n == 0 else f"{base}-{n}")
  return out


def check(target: Path, anchor: str, where: str) -> str | None:
  relative = target.resolve().relative_to(ROOT).as_posix() if target.resolve().is_relative_to(ROOT) else str(target)
  if not target.exists():
    return f"{where}: {relative} does not exist"
  if anchor and target.suffix == ".md" and anchor not in anchors(target):
    return f"{where}: {relative} has no heading with anchor #{anchor}"
  return None


def test_pages_exist():
  assert (ROOT / "docs" / "index.md").exists() and len(PAGES) > 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
  errors = []
  for target in LINK.findall(prose(page.read_text())):
    if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    errors.append(check(page.parent / path if path else page, anchor, page.name))
  assert not [e for e in errors if e], [e for e in errors if e]


def test_code_citations_resolve():
  """`docs/semantics.md#infllm` and the like, in comments and docstrings, name existing anchors."""
  errors, cited = [], 0
  for directory in CODE_DIRS:
    for source in sorted((ROOT / directory).rglob("*.py")):
      for name, anchor in CITATION.findall(source.read_text()):
        cited += 1
        errors.append(check(ROOT / "docs" / name, anchor.lstrip("#"), source.relative_to(ROOT).as_posix()))
  assert cited >= 10 and not [e for e in errors if e], [e for e in errors if e]


def test_readme_is_a_front_page():
  assert len((ROOT / "README.md").read_text().splitlines()) <= 250
