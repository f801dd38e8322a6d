"""The config reference, written from the typed config itself: every key with its type, default,
allowed values and the comment that explains it where its section's dataclass defines it. It is
what docs/config.md holds (a test keeps the two equal) and what `launch.sh --help-config` prints,
so the reference cannot drift from the code.

    python -m distill.run.config_reference > docs/config.md
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import io
import json
import sys
import textwrap
import tokenize
import typing

from distill.config import Config
from distill.errors import DistillError

INTRO = """\
# Config reference

A config is a YAML file with one mapping per section. Every key can be overridden on the command
line as a dotted path, YAML-typed: `train.steps=200`, `train.loss.temperature=2`,
`data.sources.0.samples.num_sequences=512`, `'eval.files=[a.txt,b.txt]'`. Unknown keys, wrong types
and values out of range are refused in one line naming the key's path. Which stage reads which keys
(and so runs again when they change) is listed in `distill/stages/__init__.py`.

This page is written from the config's dataclasses (`python -m distill.run.config_reference`);
`bash launch.sh --help-config [SECTION]` prints the same.
"""


def _comments(section: type) -> dict[str, str]:
    """{field name: its comment}: the comment lines right above the field in the class body and the
    one at the end of its line, joined."""
    source = textwrap.dedent(inspect.getsource(section))
    lines = source.splitlines()
    by_line: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            by_line[token.start[0]] = token.string.lstrip("#").strip()
    found = {}
    names = {item.name for item in dataclasses.fields(section)}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if name not in names or name in found or not line.startswith("    ") or line.startswith("     "):
            continue
        above, previous = [], number - 1
        while previous in by_line and lines[previous - 1].strip().startswith("#"):
            above.insert(0, by_line[previous])
            previous -= 1
        trailing = [by_line[number]] if number in by_line and not line.strip().startswith("#") else []
        found[name] = " ".join(above + trailing)
    return found


def _choice_comments(kind: type[enum.Enum]) -> dict[str, str]:
    """{value: its comment} of a choice enum whose members carry end-of-line comments."""
    try:
        source = inspect.getsource(kind)
    except (OSError, TypeError):
        return {}
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline):
        if token.type == tokenize.COMMENT:
            line = token.line.strip()
            member = line.split("=", 1)[0].strip()
            if member in kind.__members__:
                comments[kind[member].value] = token.string.lstrip("#").strip()
    return comments


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (list, typing.List):
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if origin is typing.Union:
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return f"{_type_name(args[0])} or null" if len(args) == 1 else " or ".join(map(_type_name, args))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(f"`{member.value}`" for member in hint)
    return getattr(hint, "__name__", str(hint))


def _default(item: dataclasses.Field) -> str:
    if item.default is not dataclasses.MISSING:
        value = item.default
    elif item.default_factory is not dataclasses.MISSING:
        value = item.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value == "???":  # OmegaConf's MISSING: the YAML must set it
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{json.dumps(value)}`"  # as YAML reads it (JSON is YAML)


def _section(section: type, key: str) -> list[str]:
    """Markdown for one section and, after it, the sections nested in it."""
    hints = typing.get_type_hints(section)
    comments = _comments(section)
    doc = inspect.getdoc(section) or ""
    out = [f"## `{key}`", ""]
    if doc and not doc.startswith(section.__name__ + "("):
        out += [doc.split("\n\n")[0].replace("\n", " "), ""]
    out += ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for item in dataclasses.fields(section):
        hint = hints[item.name]
        element = typing.get_args(hint)[0] if typing.get_origin(hint) in (list, typing.List) else hint
        meaning = comments.get(item.name, "")
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            values = _choice_comments(hint)
            if values:
                meaning = "; ".join(filter(None, [meaning] + [f"`{value}`: {text}" for value, text in values.items()]))
        if dataclasses.is_dataclass(element):
            child = f"{key}.{item.name}" + ("[]" if element is not hint else "")
            nested.append((element, child))
            meaning = meaning or _summary(element)
            out.append(f"| `{item.name}` | see [`{child}`](#{_anchor(child)}) | {_default(item)} | {meaning} |")
            continue
        out.append(f"| `{item.name}` | {_type_name(hint)} | {_default(item)} | {meaning.replace('|', '/')} |")
    out.append("")
    for child_section, child_key in nested:
        out += _section(child_section, child_key)
    return out


def _summary(section: type) -> str:
    """The first sentence of a section's docstring (dataclasses without one get a generated one)."""
    doc = inspect.getdoc(section) or ""
    return "" if doc.startswith(section.__name__ + "(") else doc.split(". ")[0].replace("\n", " ").rstrip(".")


def _anchor(key: str) -> str:
    return "".join(character for character in key if character.isalnum() or character in "-_").lower()


def reference(only: str | None = None) -> str:
    """The reference as markdown: the whole config, or the one top-level section `only`."""
    sections = {item.name: item for item in dataclasses.fields(Config)}
    if only is not None and only not in sections:
        raise DistillError(f"no config section '{only}' (sections: {', '.join(sections)})")
    hints = typing.get_type_hints(Config)
    out = [] if only else [INTRO]
    for name in sections:
        if only in (None, name):
            out += _section(hints[name], name)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"distill: error: --help-config takes at most one section, got {' '.join(argv)}", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(reference(argv[0] if argv else None))
    except DistillError as error:
        print(f"distill: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
