"""docs/config.md is what the config's dataclasses say, and every key there has its meaning."""

from __future__ import annotations

import dataclasses
import subprocess
import typing

from conftest import REPO
from distill.config import Config
from distill.run.config_reference import reference


def test_docs_config_md_is_what_the_generator_writes():
    assert (REPO / "docs" / "config.md").read_text() == reference(), (
        "docs/config.md differs from the config's dataclasses: python -m distill.run.config_reference > docs/config.md")


def _keys(section: type, prefix: str) -> list[str]:
    hints, keys = typing.get_type_hints(section), []
    for item in dataclasses.fields(section):
        hint = hints[item.name]
        element = typing.get_args(hint)[0] if typing.get_origin(hint) in (list, typing.List) else hint
        keys.append(f"{prefix}{item.name}")
        if dataclasses.is_dataclass(element):
            keys += _keys(element, f"{prefix}{item.name}.")
    return keys


def test_every_key_of_every_section_is_listed_with_a_type_a_default_and_a_meaning():
    rows = [line for line in reference().splitlines() if line.startswith("| `")]
    listed = {row.split("`")[1] for row in rows}
    sections = typing.get_type_hints(Config)
    keys = [key for name, section in sections.items() for key in _keys(section, f"{name}.")]
    assert len(keys) > 100 and {key.rsplit(".", 1)[-1] for key in keys} <= listed
    empty = [row for row in rows if not row.rstrip(" |").split("|")[-1].strip()]
    assert not empty, f"keys without a meaning (add a comment where the key is defined): {empty}"


def test_launch_sh_prints_one_section_or_refuses_an_unknown_one_in_a_line():
    shown = subprocess.run(["bash", str(REPO / "launch.sh"), "--help-config", "train"], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout == reference("train")
    assert "| `lr` |" in shown.stdout and "## `train.loss`" in shown.stdout and "## `eval`" not in shown.stdout
    unknown = subprocess.run(["bash", str(REPO / "launch.sh"), "--help-config", "trian"], capture_output=True, text=True)
    assert unknown.returncode == 2 and unknown.stderr.startswith("distill: error: no config section 'trian'")
