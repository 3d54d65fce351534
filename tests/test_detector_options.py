"""Detectors own their options: the registry, the config loader, the shipped config and the
build agree on every rule, so adding one is its module, a registry line and its tests."""

from __future__ import annotations

import dataclasses
import runpy
import shutil
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from proxy.config import ConfigError, Settings, parse_duration, settings_from_dict
from proxy.detectors import DETECTORS, DetectorOptions, SessionIdentity, build_detectors
from proxy.detectors.insert_loop import InsertLoop, InsertLoopOptions
from proxy.detectors.leading_wildcard import LeadingWildcard
from proxy.detectors.missing_index import MissingIndexOptions
from proxy.detectors.n_plus_one import NPlusOne, NPlusOneOptions
from proxy.detectors.not_in_subquery import NotInSubquery
from proxy.detectors.slow_query import SlowQuery, SlowQueryOptions
from proxy.durations import Duration

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "pgwarden.yaml"
WHO = SessionIdentity(user="app", database="shop", application_name="web")


def check_config(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`pgwarden check-config FILE`, as a user runs it."""
    path = tmp_path / "pgwarden.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# ------------------------------------------------------------------ registry and config


def test_the_registry_holds_each_rule_under_its_own_name() -> None:
    assert {"n_plus_one", "insert_loop", "slow_query"} <= set(DETECTORS)
    for rule, detector in DETECTORS.items():
        assert detector.rule == rule
        assert issubclass(detector.options_type, DetectorOptions)
        assert detector.options_type().enabled  # every rule is on unless turned off


def test_the_defaults_the_detectors_declare() -> None:
    assert NPlusOneOptions() == NPlusOneOptions(enabled=True, min_repeats=5)
    assert InsertLoopOptions() == InsertLoopOptions(enabled=True, min_repeats=10)
    assert SlowQueryOptions() == SlowQueryOptions(enabled=True, threshold=Duration(1.0))


def test_the_shipped_config_documents_every_rule_with_its_defaults() -> None:
    """config/pgwarden.yaml has a block per registered rule and no other, each with exactly
    the rule's option keys set to the defaults its options dataclass declares."""
    documented = yaml.safe_load(SHIPPED.read_text())["detectors"]
    assert list(documented) == list(DETECTORS)
    for rule, detector in DETECTORS.items():
        options = detector.options_type
        hints = typing.get_type_hints(options)
        fields = dataclasses.fields(options)
        assert list(documented[rule]) == [f.name for f in fields], rule
        for f in fields:
            written = documented[rule][f.name]
            value = parse_duration(written) if hints[f.name] is Duration else written
            assert value == f.default, f"detectors.{rule}.{f.name}"


def test_default_settings_hold_every_rule_with_its_defaults() -> None:
    settings = Settings()
    assert settings.detectors.rules == {r: d.options_type() for r, d in DETECTORS.items()}
    # every rule is on by default, each with its own defaults
    assert settings.detectors.enabled() == {r: d.options_type() for r, d in DETECTORS.items()}
    assert settings.detectors.enabled()["n_plus_one"] == NPlusOneOptions(min_repeats=5)
    assert settings.detectors.enabled()["slow_query"] == SlowQueryOptions(threshold=Duration(1.0))
    assert settings.detectors.enabled()["missing_index"] == MissingIndexOptions(
        min_table_rows=10000, min_saving=0.5
    )
    assert settings_from_dict(yaml.safe_load(SHIPPED.read_text())) == settings


def test_a_block_sets_its_rule_and_leaves_the_others_at_their_defaults() -> None:
    settings = settings_from_dict(
        {
            "detectors": {
                "n_plus_one": {"min_repeats": 3},
                "insert_loop": {"enabled": False},
                "slow_query": {"threshold": "250ms"},
            }
        }
    )
    rules = settings.detectors.rules
    assert rules["n_plus_one"] == NPlusOneOptions(min_repeats=3)
    assert rules["insert_loop"] == InsertLoopOptions(enabled=False)
    assert rules["slow_query"] == SlowQueryOptions(threshold=Duration(0.25))
    assert isinstance(rules["slow_query"], SlowQueryOptions)
    assert isinstance(rules["slow_query"].threshold, Duration)
    # what sessions get: the enabled rules only
    defaults = {r: d.options_type() for r, d in DETECTORS.items() if r != "insert_loop"}
    assert settings.detectors.enabled() == defaults | {
        "n_plus_one": NPlusOneOptions(min_repeats=3),
        "slow_query": SlowQueryOptions(threshold=Duration(0.25)),
    }
    assert settings_from_dict({"detectors": {"slow_query": {}}}).detectors == Settings().detectors


def test_check_config_prints_every_rule_with_its_options(tmp_path: Path) -> None:
    config = {"detectors": {"insert_loop": {"enabled": False}, "slow_query": {"threshold": "2m"}}}
    result = check_config(tmp_path, config)
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout.split("\n", 1)[1])
    printed = effective["detectors"]
    assert list(printed) == list(DETECTORS)  # every rule, in the registry's order
    assert printed["n_plus_one"] == {"enabled": True, "min_repeats": 5}
    assert printed["insert_loop"] == {"enabled": False, "min_repeats": 10}
    assert printed["slow_query"] == {"enabled": True, "threshold": "120s"}
    assert printed["leading_wildcard"] == {"enabled": True, "warn_above": "0.01s"}
    assert printed["missing_index"] == {"enabled": True, "min_table_rows": 10000, "min_saving": 0.5}
    for rule, options in printed.items():  # each with exactly its own option keys
        assert list(options) == [f.name for f in fields(DETECTORS[rule].options_type)], rule


BAD_DETECTORS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown_rule": ({"n_plus_two": {"min_repeats": 5}}, "detectors.n_plus_two: unknown key"),
    "unknown_option": ({"n_plus_one": {"min_repeat": 5}}, "detectors.n_plus_one.min_repeat:"),
    "below_minimum": ({"insert_loop": {"min_repeats": 1}}, "detectors.insert_loop.min_repeats:"),
    "not_a_number": ({"n_plus_one": {"min_repeats": "five"}}, "detectors.n_plus_one.min_repeats:"),
    "not_a_bool": ({"slow_query": {"enabled": "yes"}}, "detectors.slow_query.enabled:"),
    "bad_duration": ({"slow_query": {"threshold": "soon"}}, "detectors.slow_query.threshold:"),
    "negative_duration": ({"slow_query": {"threshold": "-1s"}}, "detectors.slow_query.threshold:"),
    "block_not_a_mapping": ({"slow_query": 5}, "detectors.slow_query: expected a mapping"),
    "section_not_a_mapping": (["n_plus_one"], "detectors: expected a mapping"),  # type: ignore[dict-item]
}


@pytest.mark.parametrize(("detectors", "error"), BAD_DETECTORS.values(), ids=BAD_DETECTORS.keys())
def test_a_bad_detector_block_is_a_config_error_naming_the_key(
    detectors: dict[str, Any], error: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({"detectors": detectors})
    assert str(caught.value).startswith(error)


@pytest.mark.parametrize(
    ("detectors", "error"),
    [BAD_DETECTORS[name] for name in ("unknown_rule", "unknown_option", "below_minimum")],
    ids=["unknown_rule", "unknown_option", "below_minimum"],
)
def test_check_config_exits_2_naming_the_key(
    tmp_path: Path, detectors: dict[str, Any], error: str
) -> None:
    result = check_config(tmp_path, {"detectors": detectors})
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert error in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------ build_detectors


def test_build_detectors_builds_each_enabled_rule_with_its_options() -> None:
    built = build_detectors(settings_from_dict({}).detectors.enabled(), WHO)
    # in the registry's order, all but the rules that do not run per session
    assert [type(d) for d in built] == [d for d in DETECTORS.values() if d.per_session]
    assert {NPlusOne, InsertLoop, SlowQuery, NotInSubquery, LeadingWildcard} <= set(
        map(type, built)
    )
    built = build_detectors(
        {"n_plus_one": NPlusOneOptions(min_repeats=3), "slow_query": SlowQueryOptions()}, WHO
    )
    n_plus_one, slow_query = built
    assert isinstance(n_plus_one, NPlusOne) and n_plus_one.min_repeats == 3
    assert isinstance(slow_query, SlowQuery) and slow_query.threshold == 1.0
    assert n_plus_one.identity == WHO


class Exploding:
    """Stands in for a detector whose constructor fails (not a Detector subclass: the
    compiled Detector cannot be subclassed by interpreted code)."""

    rule = "exploding"
    options_type = DetectorOptions

    def __init__(self, options: DetectorOptions, identity: SessionIdentity) -> None:
        raise RuntimeError("cannot start")


def test_a_detector_that_fails_to_construct_is_logged_and_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(DETECTORS, "exploding", Exploding)  # type: ignore[arg-type]
    options = {
        "n_plus_one": NPlusOneOptions(),
        "exploding": DetectorOptions(),
        "slow_query": SlowQueryOptions(threshold=Duration(0.5)),
    }
    with capture_logs() as logs:
        built = build_detectors(options, WHO)
    assert [type(d) for d in built] == [NPlusOne, SlowQuery]  # the others still run
    (entry,) = logs
    assert entry["event"] == "detector_failed"
    assert entry["rule"] == "exploding"
    assert entry["log_level"] == "error"
    assert entry["exc_info"]


def test_a_rule_not_in_the_registry_or_with_bad_options_is_logged_and_left_out() -> None:
    """Config validation rules both out; on the relay path they must still not raise."""
    options = {
        "no_such_rule": DetectorOptions(),
        "insert_loop": SlowQueryOptions(),  # another rule's options
        "slow_query": SlowQueryOptions(),
    }
    with capture_logs() as logs:
        built = build_detectors(options, WHO)
    assert [type(d) for d in built] == [SlowQuery]
    assert [(e["event"], e["rule"]) for e in logs] == [
        ("detector_failed", "no_such_rule"),
        ("detector_failed", "insert_loop"),
    ]


# ------------------------------------------------------------------------------ setup.py


def compiled(setup_py: Path) -> list[str]:
    """setup.py's COMPILED, read without building (setup() runs only as __main__)."""
    return list(runpy.run_path(str(setup_py))["COMPILED"])


def test_setup_compiles_every_detector_module() -> None:
    listed = compiled(ROOT / "setup.py")
    detectors = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("proxy/detectors/*.py"))
    assert set(detectors) <= set(listed)
    assert all((ROOT / path).is_file() for path in listed)
    assert listed == sorted(set(listed))


def test_setup_compiles_a_new_detector_module_unlisted(tmp_path: Path) -> None:
    shutil.copy(ROOT / "setup.py", tmp_path)
    (tmp_path / "proxy" / "detectors").mkdir(parents=True)
    (tmp_path / "proxy" / "detectors" / "new_rule.py").write_text('"""A new rule."""\n')
    assert "proxy/detectors/new_rule.py" in compiled(tmp_path / "setup.py")
