"""The READMEs document every flag of every script, in English and in Chinese."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

import infer
import split_dataset
import train
from ui_classification import app

PARSERS = {"train.py": train.get_args_parser(), "infer.py": infer.get_args_parser(),
           "split_dataset.py": split_dataset.get_args_parser(), "runui.py": app.get_args_parser()}


def _main_flags(parser) -> list[str]:
    """The first --long spelling of each option (dashed aliases need no separate mention)."""
    return [next(o for o in action.option_strings if o.startswith("--"))
            for action in parser._actions if action.option_strings and action.dest != "help"]


@pytest.mark.parametrize("readme", ["README.md", "README.zh-CN.md"])
@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_flag_is_documented(readme, script):
    text = (REPO / readme).read_text(encoding="utf-8")
    documented = set(re.findall(r"--[a-z][a-z0-9_]*", text))
    missing = [flag for flag in _main_flags(PARSERS[script]) if flag not in documented]
    assert not missing, f"{readme} does not mention {script} {missing}"


def test_readme_opens_with_the_two_commands():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert block == ["pip install -r requirements.txt && python train.py",
                     "pip install -r requirements-dev.txt && python -m pytest"]
    assert "python -m pytest" in (REPO / ".ci" / "run").read_text()
