"""Typed, validated settings loaded from YAML.

Each section is a frozen dataclass; the loader walks the YAML against the dataclass fields,
so an unknown key or a bad value fails at load with the dotted key and what was expected.
Settings are swapped in whole on reload, never edited in place.

Features that own their options declare them where they live, and this module only
assembles them: each detector its own options dataclass (the `detectors:` section is built
from the registry, proxy.detectors.DETECTORS), rewrite and block rules their entries and
checks (proxy.rewriters.rules). Those modules never import this one.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxy.detectors import DETECTORS, DetectorOptions
from proxy.durations import Duration, parse_duration
from proxy.rewriters.rules import BlockRule, RewriteRule, RuleMatch, check_command, check_rules

__all__ = [
    "ADMIN_TOKEN_ENV",
    "ADVISOR_PASSWORD_ENV",
    "Address",
    "BlockRule",
    "ConfigError",
    "RewriteRule",
    "RuleMatch",
    "Settings",
    "deep_merge",
    "load_settings",
    "parse_address",
    "parse_duration",
    "settings_from_dict",
]


class ConfigError(ValueError):
    """A config value is wrong; the message starts with the dotted key."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: object, default_port: int | None = None) -> Address:
    text = str(value).strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        port_text = str(default_port)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected HOST:PORT with a port from 1 to 65535, got {value!r}")
    return Address(host, int(port_text))


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def _positive(**extra: Any) -> dict[str, Any]:
    return {"minimum": 1, **extra}


@dataclass(frozen=True)
class UpstreamSettings:
    address: Address = Address("127.0.0.1", 5432)
    sslmode: str = field(
        default="prefer", metadata=_choice("disable", "prefer", "require", "verify-full")
    )
    sslrootcert: str | None = None
    connect_timeout: Duration = Duration(10.0)


@dataclass(frozen=True)
class TLSSettings:
    cert: str | None = None
    key: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


@dataclass(frozen=True)
class AdminSettings:
    listen: Address = Address("127.0.0.1", 9930)
    ready_requires_upstream: bool = False  # /readyz probes PostgreSQL too
    metrics_public: bool = False  # /metrics answers without the token (for scrapers)
    # The token that enables the admin actions, read from this file or else from
    # $PGWARDEN_ADMIN_TOKEN into `token`: a secret, so never in the YAML, a repr or the
    # output of check-config.
    token_file: str | None = None
    token: str | None = field(default=None, repr=False, metadata={"internal": True})


@dataclass(frozen=True)
class ShutdownSettings:
    drain_timeout: Duration = Duration(30.0)


@dataclass(frozen=True)
class LimitSettings:
    max_client_connections: int = field(default=1000, metadata=_positive())
    startup_timeout: Duration = Duration(10.0)
    max_message_size: int = field(default=0x3FFFFFFF, metadata=_positive(maximum=0x3FFFFFFF))


@dataclass(frozen=True)
class LoggingSettings:
    format: str = field(default="json", metadata=_choice("json", "console"))
    level: str = field(
        default="info", metadata=_choice("debug", "info", "warning", "error", "critical")
    )


@dataclass(frozen=True)
class AnalysisSettings:
    enabled: bool = True
    cache_size: int = field(default=10000, metadata=_positive())


@dataclass(frozen=True)
class MetricsSettings:
    max_fingerprints: int = field(default=200, metadata=_positive(maximum=10000))


def _detector_defaults() -> dict[str, DetectorOptions]:
    return {rule: detector.options_type() for rule, detector in DETECTORS.items()}


@dataclass(frozen=True)
class DetectorSettings:
    """The `detectors:` section: a block per registered rule, the fields of its detector's
    `options_type` (proxy.detectors.DETECTORS), so a new rule adds its block by itself."""

    rules: Mapping[str, DetectorOptions] = field(default_factory=_detector_defaults)

    def enabled(self) -> dict[str, DetectorOptions]:
        """The options of each enabled detector, by rule id (what build_detectors takes)."""
        return {rule: options for rule, options in self.rules.items() if options.enabled}


@dataclass(frozen=True)
class AdviceSettings:
    repeat_interval: Duration = Duration(600.0)


@dataclass(frozen=True)
class AdvisorSettings:
    """The index advisor (proxy.advisor): off without a `dsn`. Its password is read from
    password_file or $PGWARDEN_ADVISOR_PASSWORD into `password`, never from the YAML,
    never in a repr or the output of check-config."""

    dsn: str | None = None  # libpq keywords or URI, without dbname and password
    password_file: str | None = None
    interval: Duration = Duration(60.0)
    min_calls: int = field(default=5, metadata=_positive())
    min_total_time: Duration = Duration(1.0)
    max_explains_per_minute: int = field(default=30, metadata=_positive())
    statement_timeout: Duration = Duration(2.0)
    password: str | None = field(default=None, repr=False, metadata={"internal": True})


@dataclass(frozen=True)
class TimeoutMatch:
    """Every given field must match; a rule with no fields matches every statement."""

    tables: tuple[str, ...] | None = None
    command: str | None = None
    fingerprint: str | None = None
    user: str | None = None
    database: str | None = None
    application_name: str | None = None


@dataclass(frozen=True)
class TimeoutRule:
    name: str
    match: TimeoutMatch = TimeoutMatch()
    statement: Duration | None = None
    transaction: Duration | None = None


@dataclass(frozen=True)
class TimeoutSettings:
    statement: Duration = Duration(0.0)
    transaction: Duration = Duration(0.0)
    idle_in_transaction: Duration = Duration(0.0)
    server_side: bool = False
    rules: tuple[TimeoutRule, ...] = ()


@dataclass(frozen=True)
class Settings:
    listen: Address = Address("127.0.0.1", 6432)
    upstream: UpstreamSettings = UpstreamSettings()
    tls: TLSSettings = TLSSettings()
    admin: AdminSettings = AdminSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    limits: LimitSettings = LimitSettings()
    logging: LoggingSettings = LoggingSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    detectors: DetectorSettings = DetectorSettings()
    advice: AdviceSettings = AdviceSettings()
    advisor: AdvisorSettings = AdvisorSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    metrics: MetricsSettings = MetricsSettings()
    rewrites: tuple[RewriteRule, ...] = ()
    blocks: tuple[BlockRule, ...] = ()
    source: str | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """The effective settings as plain YAML-able data (for check-config)."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if isinstance(value, DetectorSettings):  # written as its blocks, like the YAML
        return {rule: _plain(options) for rule, options in value.rules.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, Address):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.metadata.get("internal")
        }
    if isinstance(value, Address):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Duration):
        return f"{float(value):g}s"
    return value


def _convert(annotation: Any, value: Any, meta: typing.Mapping[str, Any], key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, meta, key)
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(
            _convert(item_type, item, {}, f"{key}[{index}]") for index, item in enumerate(value)
        )
    section = isinstance(annotation, type) and dataclasses.is_dataclass(annotation)
    if section and annotation is not Address:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        if annotation is DetectorSettings:
            return _build_detectors(value, key)
        return _build(annotation, value, key)
    try:
        if annotation is Address:
            result: Any = parse_address(value)
        elif annotation is Duration:
            result = parse_duration(value)
        elif annotation is bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            result = value
        elif annotation is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected a whole number, got {value!r}")
            result = value
        elif annotation is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"expected a number, got {value!r}")
            result = float(value)
        elif annotation is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            result = value
        else:
            raise ValueError(f"unsupported setting type {annotation!r}")
        if "choices" in meta and result not in meta["choices"]:
            raise ValueError(f"expected one of {', '.join(meta['choices'])}, got {value!r}")
        if "minimum" in meta and result < meta["minimum"]:
            raise ValueError(f"expected at least {meta['minimum']}, got {value!r}")
        if "maximum" in meta and result > meta["maximum"]:
            raise ValueError(f"expected at most {meta['maximum']}, got {value!r}")
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return result


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            raise ConfigError(f"{key}: unknown key (expected one of {', '.join(known)})")
        kwargs[name] = _convert(hints[name], value, known[name].metadata, key)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        if name not in kwargs:
            raise ConfigError(f"{prefix}.{name}: required" if prefix else f"{name}: required")
    return cls(**kwargs)


def _build_detectors(data: dict[str, Any], prefix: str) -> DetectorSettings:
    """Each rule's block validated against its detector's options dataclass; a rule left
    out keeps that dataclass's defaults."""
    rules = _detector_defaults()
    for rule, value in data.items():
        key = f"{prefix}.{rule}"
        if rule not in rules:
            raise ConfigError(f"{key}: unknown key (expected one of {', '.join(rules)})")
        rules[rule] = _convert(DETECTORS[rule].options_type, value, {}, key)
    return DetectorSettings(rules)


def settings_from_dict(data: dict[str, Any] | None, *, source: str | None = None) -> Settings:
    settings = _build(Settings, data or {}, "")
    settings = dataclasses.replace(settings, source=source)
    _check(settings)
    return _with_advisor_password(_with_admin_token(settings))


ADVISOR_PASSWORD_ENV = "PGWARDEN_ADVISOR_PASSWORD"


def _with_advisor_password(settings: Settings) -> Settings:
    """Checks advisor.dsn (the advisor picks the database; a password has its own place)
    and reads the password from advisor.password_file, else $PGWARDEN_ADVISOR_PASSWORD;
    an error names where it came from, never what it holds."""
    advisor = settings.advisor
    if advisor.dsn is None:
        return settings
    from psycopg.conninfo import conninfo_to_dict  # only a config that uses the advisor

    try:
        keywords = conninfo_to_dict(advisor.dsn)
    except Exception:
        raise ConfigError("advisor.dsn: not a libpq connection string or URI") from None
    for keyword in ("dbname", "password"):
        if keyword in keywords:
            raise ConfigError(
                f"advisor.dsn: leave {keyword} out (the advisor connects to the database each "
                "statement ran in; the password comes from advisor.password_file or "
                f"{ADVISOR_PASSWORD_ENV})"
            )
    if advisor.interval <= 0:
        raise ConfigError("advisor.interval: must be more than 0")
    if advisor.password_file:
        try:
            password = Path(advisor.password_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(
                f"advisor.password_file: cannot read {advisor.password_file!r}: {why}"
            ) from None
    else:
        password = os.environ.get(ADVISOR_PASSWORD_ENV, "")
    if not password:
        return settings
    return dataclasses.replace(settings, advisor=dataclasses.replace(advisor, password=password))


ADMIN_TOKEN_ENV = "PGWARDEN_ADMIN_TOKEN"
_MIN_TOKEN_LENGTH = 16


def _with_admin_token(settings: Settings) -> Settings:
    """The admin token from admin.token_file, else from $PGWARDEN_ADMIN_TOKEN (where
    secrets are mounted); an error names where it came from, never what it holds."""
    admin = settings.admin
    if admin.token_file:
        where = "admin.token_file"
        try:
            token = Path(admin.token_file).read_bytes().decode("latin-1").strip()
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot read {admin.token_file!r}: {exc.strerror}"
            ) from None
    else:
        where = ADMIN_TOKEN_ENV
        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
        if not token:
            return settings
    if (
        len(token) < _MIN_TOKEN_LENGTH
        or not (token.isascii() and token.isprintable())
        or " " in token
    ):
        raise ConfigError(
            f"{where}: the admin token must be at least {_MIN_TOKEN_LENGTH} printable ASCII "
            "characters without spaces (e.g. the output of `openssl rand -hex 32`)"
        )
    return dataclasses.replace(settings, admin=dataclasses.replace(admin, token=token))


def _check(settings: Settings) -> None:
    tls = settings.tls
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError("tls: cert and key must be given together")
    for name in ("cert", "key"):
        path = getattr(tls, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"tls.{name}: no such file {path!r}")
    _check_timeouts(settings.timeouts)
    names: set[str] = set()  # rewrites and blocks share one namespace
    _check_names("rewrites", settings.rewrites, names)
    _check_names("blocks", settings.blocks, names)
    try:
        check_rules(settings.rewrites, settings.blocks)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    up = settings.upstream
    if up.sslmode == "verify-full" and not up.sslrootcert:
        raise ConfigError("upstream.sslrootcert: required when sslmode is verify-full")
    if up.sslrootcert and not Path(up.sslrootcert).is_file():
        raise ConfigError(f"upstream.sslrootcert: no such file {up.sslrootcert!r}")


def _check_names(section: str, rules: tuple[Any, ...], names: set[str]) -> None:
    """Rule names are required and unique: logs, metrics and error messages carry them."""
    for index, rule in enumerate(rules):
        key = f"{section}[{index}].name"
        if not rule.name:
            raise ConfigError(f"{key}: must not be empty")
        if rule.name in names:
            raise ConfigError(f"{key}: duplicate rule name {rule.name!r}")
        names.add(rule.name)


def _check_timeouts(timeouts: TimeoutSettings) -> None:
    _check_names("timeouts.rules", timeouts.rules, set())
    for index, rule in enumerate(timeouts.rules):
        key = f"timeouts.rules[{index}]"
        if rule.statement is None and rule.transaction is None:
            raise ConfigError(f"{key}: set statement, transaction or both")
        if rule.match.command is not None:
            try:
                check_command(f"{key}.match.command", rule.match.command)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Config data `base` with `override` laid over it, mappings merged key by key, so a
    variant (a test's, a benchmark's) states only the settings it changes."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(path: str | os.PathLike[str] | None, overrides: dict[str, Any]) -> Settings:
    """Reads the YAML file (if any) and applies command-line overrides on top.

    `overrides` maps dotted keys (`upstream.address`) to raw values, validated like the file.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{os.fspath(path)}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{os.fspath(path)}: the top level must be a mapping")
        data = loaded or {}
    for dotted, value in overrides.items():
        target = data
        *parents, last = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{part}: expected a mapping")
        target[last] = value
    return settings_from_dict(data, source=os.fspath(path) if path else None)
