"""The documentation: every flag of every script in English and in Chinese, links and pictures that
exist, READMEs short enough to be landing pages, and a Chinese copy of every page under docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

import audit_dataset
import export
import infer
import split_dataset
import train
from ui_classification import app

# Add a script here and its flags must be documented in both languages.
PARSERS = {"train.py": train.get_args_parser(), "audit_dataset.py": audit_dataset.get_args_parser(), "export.py": export.get_args_parser(), "infer.py": infer.get_args_parser(),
           "split_dataset.py": split_dataset.get_args_parser(), "runui.py": app.get_args_parser()}

DOCS = REPO / "docs"
ZH_DOCS = DOCS / "zh-CN"
ENGLISH_PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
CHINESE_PAGES = [REPO / "README.zh-CN.md", *sorted(ZH_DOCS.glob("*.md"))]
ALL_PAGES = [REPO / "README.md", REPO / "README.zh-CN.md", *sorted(DOCS.rglob("*.md"))]
LANDING_PAGES = ["README.md", "README.zh-CN.md"]
MAX_LANDING_LINES = 300
MAX_IMAGE_BYTES = 200 * 1024

FLAG = re.compile(r"--[a-z][a-z0-9_]*")
FENCED_BLOCK = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
MARKDOWN_TARGET = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_TARGET = re.compile(r"<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)


def _main_flags(parser) -> list[str]:
    """The first --long spelling of each option (dashed aliases need no separate mention)."""
    return [next(o for o in action.option_strings if o.startswith("--"))
            for action in parser._actions if action.option_strings and action.dest != "help"]


def _flags_in(pages: list[Path]) -> set[str]:
    return {flag for page in pages for flag in FLAG.findall(page.read_text(encoding="utf-8"))}


def _link_targets(page: Path) -> list[str]:
    """Targets of markdown links and images (and HTML img/a), outside code blocks and code spans."""
    text = INLINE_CODE.sub("", FENCED_BLOCK.sub("", page.read_text(encoding="utf-8")))
    return MARKDOWN_TARGET.findall(text) + HTML_TARGET.findall(text)


def _flag_table(readme: str) -> str:
    """The rows of the table under the README's '## train.py ...' heading."""
    lines = (REPO / readme).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## train.py"))
    section = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        section.append(line)
    return "\n".join(line for line in section if line.startswith("|"))


def test_the_page_lists_are_found():
    """The other tests mean nothing if the globs find no pages."""
    assert len(ENGLISH_PAGES) > 5 and len(CHINESE_PAGES) > 5
    assert all(page.is_file() for page in ALL_PAGES)


@pytest.mark.parametrize("language", ["English", "Chinese"])
@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_flag_is_documented(language, script):
    pages = ENGLISH_PAGES if language == "English" else CHINESE_PAGES
    documented = _flags_in(pages)
    missing = [flag for flag in _main_flags(PARSERS[script]) if flag not in documented]
    where = ", ".join(str(page.relative_to(REPO)) for page in pages)
    assert not missing, f"{script} {missing} not documented in {language} ({where})"


@pytest.mark.parametrize("readme", LANDING_PAGES)
def test_readme_flag_table_lists_every_train_flag(readme):
    rows = _flag_table(readme)
    in_first_column = {flag for row in rows.splitlines() for flag in FLAG.findall(row.split("|")[1])}
    missing = [flag for flag in _main_flags(PARSERS["train.py"]) if flag not in in_first_column]
    assert not missing, f"the train.py flag table of {readme} lacks {missing}"


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(page):
    broken = []
    for target in _link_targets(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http(s), mailto: and anchors within the page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)} links to missing files: {broken}"


@pytest.mark.parametrize("readme", LANDING_PAGES)
def test_readme_is_a_landing_page(readme):
    lines = (REPO / readme).read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LANDING_LINES, f"{readme} has {len(lines)} lines; move detail into docs/"


def test_every_page_has_a_chinese_copy():
    english = {page.name for page in DOCS.glob("*.md")}
    chinese = {page.name for page in ZH_DOCS.glob("*.md")}
    assert not english - chinese, f"docs/zh-CN/ lacks {sorted(english - chinese)}"
    assert not chinese - english, f"docs/zh-CN/ has pages with no English original: {sorted(chinese - english)}"


def test_pictures_stay_small():
    pictures = [p for p in DOCS.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".gif", ".webp"}]
    assert pictures
    too_big = [f"{p.relative_to(REPO)} ({p.stat().st_size // 1024} KB)" for p in pictures
               if p.stat().st_size > MAX_IMAGE_BYTES]
    assert not too_big, f"pictures over {MAX_IMAGE_BYTES // 1024} KB: {too_big}"


def test_readme_opens_with_the_two_commands():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert block == ["pip install -r requirements.txt && python train.py",
                     "pip install -r requirements-dev.txt && python -m pytest"]
    assert "python -m pytest" in (REPO / ".ci" / "run").read_text()
