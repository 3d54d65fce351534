"""config/pgwarden.yaml documents every setting pgwarden reads, at its place, with its default.

The settings are found by walking proxy.config's Settings dataclasses, so a key added there
fails here until the file documents it. List-valued settings (timeouts.rules, rewrites,
blocks) default to empty: their documentation is the comments around them, which must name
every field of their entries and hold a commented example that loads. The detectors' blocks
are checked against the registry in tests/test_detector_options.py.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Address, DetectorSettings, Settings, settings_from_dict

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "pgwarden.yaml"
TEXT = SHIPPED.read_text()
DOCUMENTED = yaml.safe_load(TEXT)
_KEY_LINE = re.compile(r"^( *)([A-Za-z_]\w*):")


def _is_section(annotation: Any) -> bool:
    return dataclasses.is_dataclass(annotation) and annotation is not Address


def _entry_type(annotation: Any) -> type | None:
    """The dataclass of a list-valued setting's entries (`tuple[TimeoutRule, ...]`)."""
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        return item if _is_section(item) else None
    return None


def settings(cls: type = Settings, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The path of every setting under `cls`, sections walked into; internal fields (not
    read from the file) and the detectors' blocks left out."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if f.metadata.get("internal") or annotation is DetectorSettings:
            continue
        if _is_section(annotation):
            yield from settings(annotation, (*path, f.name))
        else:
            yield (*path, f.name)


def field_of(path: tuple[str, ...]) -> tuple[Any, Any]:
    """(annotation, default) of the setting at `path`."""
    cls: Any = Settings
    for name in path[:-1]:
        cls = typing.get_type_hints(cls)[name]
    (f,) = (f for f in dataclasses.fields(cls) if f.name == path[-1])
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    return typing.get_type_hints(cls)[f.name], default


def nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    for name in reversed(path):
        value = {name: value}
    return value


SETTINGS = list(settings())
LISTS = [path for path in SETTINGS if _entry_type(field_of(path)[0]) is not None]


def test_the_walk_finds_the_settings() -> None:
    """Guards the walk itself: it reaches nested sections and the list-valued ones."""
    assert ("metrics", "max_fingerprints") in SETTINGS
    assert ("upstream", "connect_timeout") in SETTINGS
    assert ("listen",) in SETTINGS
    assert {("timeouts", "rules"), ("rewrites",), ("blocks",)} <= set(LISTS)


@pytest.mark.parametrize("path", SETTINGS, ids=[".".join(p) for p in SETTINGS])
def test_every_setting_is_in_the_shipped_config_with_its_default(path: tuple[str, ...]) -> None:
    dotted = ".".join(path)
    section = DOCUMENTED
    for depth, name in enumerate(path):
        where = ".".join(path[:depth]) or "the top level"
        assert isinstance(section, dict) and name in section, (
            f"{dotted}: not documented in config/pgwarden.yaml (no {name!r} under {where})"
        )
        section = section[name]
    _, default = field_of(path)
    loaded: Any = settings_from_dict(nested(path, section))
    for name in path:
        loaded = getattr(loaded, name)
    assert loaded == default, f"{dotted}: config/pgwarden.yaml says {section!r}, not {default!r}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """The first line after `start` that is not blank and is indented `indent` or less:
    where the block of a key on line `start` ends, comments included."""
    for index in range(start + 1, len(lines)):
        if lines[index].strip() and _indent(lines[index]) <= indent:
            return index
    return len(lines)


def documentation(path: tuple[str, ...]) -> list[str]:
    """The lines that document a list-valued setting: from the end of the sibling before it
    to the next sibling, where list-valued siblings next to each other (rewrites, blocks)
    share theirs."""
    lines = TEXT.splitlines()
    start, end, indent = 0, len(lines), 0
    for name in path[:-1]:  # the parent section's block
        (line,) = (
            i
            for i in range(start, end)
            if (m := _KEY_LINE.match(lines[i])) and len(m[1]) == indent and m[2] == name
        )
        start, end = line + 1, _block_end(lines, line, indent)
        indent = _indent(next(text for text in lines[start:end] if text.strip()))
    siblings = [
        (i, m[2])
        for i in range(start, end)
        if (m := _KEY_LINE.match(lines[i])) and len(m[1]) == indent
    ]
    lists = {p[-1] for p in LISTS if p[:-1] == path[:-1]}
    position = [name for _, name in siblings].index(path[-1])
    before = [i for i, name in siblings[:position] if name not in lists]
    after = [i for i, name in siblings[position:] if name not in lists]
    first = _block_end(lines, before[-1], indent) if before else start
    return lines[first : after[0] if after else end]


def _entry_fields(cls: type) -> Iterator[str]:
    for f in dataclasses.fields(cls):
        yield f.name
        annotation = typing.get_type_hints(cls)[f.name]
        if _is_section(annotation):
            yield from _entry_fields(annotation)


@pytest.mark.parametrize("path", LISTS, ids=[".".join(p) for p in LISTS])
def test_the_comments_of_a_list_setting_name_every_field_of_its_entries(
    path: tuple[str, ...],
) -> None:
    entry = _entry_type(field_of(path)[0])
    assert entry is not None
    comments = "\n".join(line for line in documentation(path) if line.lstrip().startswith("#"))
    missing = [name for name in _entry_fields(entry) if not re.search(rf"\b{name}\b", comments)]
    assert not missing, f"{'.'.join(path)}: its comments never mention {missing}"


def commented_example(path: tuple[str, ...]) -> list[Any]:
    """The entries of the commented example (`# rules:` and the lines under it), loaded."""
    lines = documentation(path)
    heads = [i for i, line in enumerate(lines) if line.strip() == f"# {path[-1]}:"]
    assert heads, f"{'.'.join(path)}: no commented example (a `# {path[-1]}:` line)"
    prefix = lines[heads[0]].split("#")[0] + "# "
    body = [path[-1] + ":"]
    for line in lines[heads[0] + 1 :]:
        if not line.startswith(prefix + " "):
            break
        body.append(line.removeprefix(prefix))
    return yaml.safe_load("\n".join(body))[path[-1]]


@pytest.mark.parametrize("path", LISTS, ids=[".".join(p) for p in LISTS])
def test_the_commented_example_of_a_list_setting_is_a_valid_config(path: tuple[str, ...]) -> None:
    entries = commented_example(path)
    assert entries, f"{'.'.join(path)}: the commented example has no entries"
    loaded: Any = settings_from_dict(nested(path, entries))
    for name in path:
        loaded = getattr(loaded, name)
    assert [rule.name for rule in loaded] == [entry["name"] for entry in entries]
