"""Settings: defaults < config file (YAML or TOML) < ``AUTHHOOK_*`` environment < explicit arguments.

Validated once at start and passed down; nothing reads configuration from a global.
Nested sections use ``__`` in environment names: ``AUTHHOOK_CACHE__ALLOW_TTL_S=30``.
"""

from __future__ import annotations

import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from authhook.cache import DEFAULT_ALLOW_TTL_S, DEFAULT_DENY_TTL_S, DEFAULT_MAXSIZE
from authhook.decision_log import DEFAULT_FLUSH_INTERVAL_S, DEFAULT_RING_SIZE
from authhook.errors import ConfigError
from authhook.topics import DEFAULT_TEMPLATE, TopicTemplate

DEFAULT_STORE_URL = "sqlite:///authhook.db"
# The config file ``load_settings`` is reading, for ``Settings.settings_customise_sources`` (a classmethod that
# pydantic-settings calls with no arguments of ours); set only for the duration of one ``Settings(...)``.
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("authhook_config_file", default=None)


class CacheSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    maxsize: int = Field(default=DEFAULT_MAXSIZE, ge=1)
    allow_ttl_s: float = Field(default=DEFAULT_ALLOW_TTL_S, gt=0)
    deny_ttl_s: float = Field(default=DEFAULT_DENY_TTL_S, gt=0)


class DecisionLogSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path | None = Field(default=None, description="JSON-lines file; default: beside the sqlite database")
    enabled: bool = True
    ring_size: int = Field(default=DEFAULT_RING_SIZE, ge=1)
    flush_interval_s: float = Field(default=DEFAULT_FLUSH_INTERVAL_S, gt=0)


class HttpSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = Field(default=None, description="require client certificates signed by this CA")
    gc_young_threshold: int = Field(
        default=20_000,
        ge=0,
        description="`serve` only: allocations between young-generation garbage collections (Python's default "
        "is 700; 0 leaves it). The decision log keeps each decision alive for a while, and at 700 the collector "
        "walks them again and again under load (~0.5 % of a cache-hit request)",
    )


class EvaluatorSettings(BaseModel):
    """Which policy engine decides. The cache, decision log, explain and every adapter work the same with each."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["inhouse", "opa", "cedar"] = "inhouse"
    opa_mode: Literal["embedded", "remote"] = "embedded"
    opa_url: str | None = Field(default=None, description="OPA server base URL, for opa_mode remote")
    opa_policy: Path | None = Field(default=None, description="Rego file for embedded mode; default: the reference")
    opa_deadline_s: float = Field(default=0.2, gt=0, description="remote: the whole call, retries included")
    opa_retries: int = Field(default=1, ge=0, le=10, description="remote: further attempts after a transport error")
    opa_breaker_failures: int = Field(
        default=5, ge=1, description="remote: consecutive failed calls that open the circuit breaker"
    )
    opa_breaker_reset_s: float = Field(
        default=5.0, gt=0, description="remote: how long an open breaker fails fast before one trial call"
    )
    cedar_policies: Path | None = Field(default=None, description="default: the reference policies")
    cedar_schema: Path | None = None
    cedar_entities: Path | None = Field(
        default=None, description="a Cedar JSON entities file to decide on instead of the store's model"
    )

    @model_validator(mode="after")
    def _remote_needs_url(self) -> EvaluatorSettings:
        if self.kind == "opa" and self.opa_mode == "remote" and not self.opa_url:
            raise ValueError("evaluator.opa_url is required for a remote OPA")
        return self


class WebhookSettings(BaseModel):
    """How brokers prove they are the broker: a shared token, and/or mutual TLS (``http.tls_client_ca``).

    The token is accepted in a header (EMQX can send custom headers) or as a query parameter of the
    configured URL (VerneMQ, mosquitto-go-auth and RabbitMQ cannot add headers).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: SecretStr | None = None
    header: str = "x-authhook-token"
    query_param: str = "token"

    @field_validator("token")
    @classmethod
    def _header_safe(cls, value: SecretStr | None) -> SecretStr | None:
        # It travels in a header or a URL, and the edge compares it as ASCII text (no encoding per request).
        text = value.get_secret_value() if value is not None else None
        if text is not None and not (text and all("!" <= c <= "~" for c in text)):
            raise ValueError("the webhook token must be printable ASCII without spaces")  # never echo the value
        return value


class BrokerSettings(BaseModel):
    """Per-broker answer options; the defaults are the safe ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    on_failure: Literal["deny", "ignore"] = Field(
        default="deny",
        description="when the store or evaluator fails: deny, or let the broker ask its next authorizer "
        "(EMQX `ignore`, VerneMQ `next`)",
    )
    vernemq_cache_max_age_s: int | None = Field(
        default=None, ge=1, description="send `cache-control: max-age=N` on VerneMQ allows; N is a stale window"
    )
    emqx_return_acl: bool = Field(
        default=False,
        description="answer a successful EMQX CONNECT with the client's ACL, which EMQX then enforces locally "
        "for the session (what it cannot express exactly is still asked over HTTP). Safe with "
        "`revocation.emqx`: a change that shrinks the ACL kicks the session at once; without it a revoke "
        "waits for the client to reconnect or the ACL to expire (`emqx_acl_ttl_s`)",
    )
    emqx_acl_ttl_s: int = Field(
        default=300,
        ge=1,
        le=31 * 24 * 3600,  # EMQX refuses an expire_at that looks like milliseconds; keep it plainly seconds
        description="with `emqx_return_acl`, the ACL's lifetime: authhook sends `expire_at` = now + this, and "
        "EMQX disconnects the client then, so a revoke reaches live sessions within this many seconds",
    )
    mosquitto_response_mode: Literal["status", "json", "text"] = "status"
    rabbitmq_exchange: str = "amq.topic"
    rabbitmq_vhost: str = Field(
        default="/", min_length=1, description="the one RabbitMQ virtual host MQTT clients may use; others are denied"
    )


class ClientIdTenantSettings(BaseModel):
    """One tenant's client-id rule, overriding ``client_ids.policy`` (see ``ClientIdSettings``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Literal["exact", "prefixed", "pattern"] = "prefixed"
    pattern: str | None = Field(
        default=None,
        description="for policy `pattern`: a regular expression the whole client id must match; `{username}` "
        "stands for the connecting username, escaped",
    )

    @model_validator(mode="after")
    def _pattern_compiles(self) -> ClientIdTenantSettings:
        if self.policy == "pattern":
            if not self.pattern:
                raise ValueError("client-id policy `pattern` needs a `pattern`")
            if "{username}" not in self.pattern:
                # Without it two subjects of a tenant could match one client id and take over each other's
                # sessions; with it every client id still has one owner.
                raise ValueError("a client-id pattern must name `{username}`")
            import re

            try:
                re.compile(self.pattern.replace("{username}", "u"))
            except re.error as exc:
                raise ValueError(f"client-id pattern does not compile: {exc}") from None
        return self


class ClientIdSettings(BaseModel):
    """Which MQTT client ids a subject may connect with: client ids are part of the tenant boundary.

    A broker keys sessions, queued messages and queues (RabbitMQ's ``mqtt-subscription-<clientid>qos1``) on
    the client id, so whoever connects with a client id takes over that session. The owner of a client id is
    the subject with the longest id ``u`` such that the client id is ``u`` or ``u`` + a separator + more;
    nobody else may use it, under any policy. ``exact`` also requires the client id to be the username,
    ``prefixed`` (the default) allows a suffix, ``pattern`` requires a regular expression naming
    ``{username}`` (so each client id still has one owner). See ``authhook.sessions.client_ids``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Literal["exact", "prefixed", "pattern"] = "prefixed"
    separators: str = Field(default=":-_", min_length=1, description="characters that may follow the username")
    pattern: str | None = None
    tenants: dict[str, ClientIdTenantSettings] = Field(default_factory=dict)

    @field_validator("separators")
    @classmethod
    def _separators_safe(cls, value: str) -> str:
        if any(c in "+#/\x00" for c in value):
            raise ValueError("client-id separators cannot include `+`, `#`, `/` or NUL")
        return value

    @model_validator(mode="after")
    def _default_pattern(self) -> ClientIdSettings:
        ClientIdTenantSettings(policy=self.policy, pattern=self.pattern)  # same checks for the default
        return self


class BrokerApiCredentials(BaseModel):
    """Where a broker's management API is and how to log in; the secret comes from the environment or a file.

    ``secret`` is never logged (``SecretStr``); ``secret_file`` is read at start, its content stripped.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    username: str | None = Field(default=None, description="RabbitMQ user, EMQX API key, VerneMQ API key")
    secret: SecretStr | None = Field(default=None, description="RabbitMQ password / EMQX API secret")
    secret_file: Path | None = None

    def resolved_secret(self) -> str | None:
        if self.secret is not None:
            return self.secret.get_secret_value()
        if self.secret_file is not None:
            try:
                return self.secret_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read secret file `{self.secret_file}`: {exc.strerror}") from exc
        return None


class EmqxApiSettings(BrokerApiCredentials):
    action: Literal["kick", "clean_cache"] = Field(
        default="kick",
        description="`kick` closes the client (it reconnects and is asked again); `clean_cache` drains its "
        "authorization cache and resets the node cache (not enough with `emqx_return_acl`, which then kicks)",
    )


class VernemqApiSettings(BrokerApiCredentials):
    cleanup: bool = Field(default=False, description="also drop the session's stored state (`--cleanup`)")
    node_urls: tuple[str, ...] = Field(
        default=(), description="every node's API, for the node-local webhook cache clear; default: `url`"
    )


class RevocationSettings(BaseModel):
    """Revokes that reach live sessions: re-check what each live session was allowed after every committed
    change, and close (or refresh) exactly the sessions that lost something, through the broker's own API.

    Off for a broker until its API is configured here.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    poll_interval_s: float = Field(default=0.05, gt=0, le=5, description="how often the revision board is read")
    max_pairs_per_subject: int = Field(
        default=512,
        ge=1,
        description="allowed (action, topic) pairs remembered per subject; past it, any "
        "change in the subject's tenant closes its sessions",
    )
    attempts: int = Field(default=3, ge=1, le=10, description="tries per management call")
    timeout_s: float = Field(default=2.0, gt=0, description="per management call")
    rabbitmq: BrokerApiCredentials | None = None
    emqx: EmqxApiSettings | None = None
    vernemq: VernemqApiSettings | None = None


class Settings(BaseSettings):
    """Everything authhook reads at start."""

    model_config = SettingsConfigDict(env_prefix="AUTHHOOK_", env_nested_delimiter="__", frozen=True, extra="forbid")

    store_url: str = DEFAULT_STORE_URL
    store_deadline_s: float = Field(
        default=0.5, gt=0, description="longest a decision waits for the database before failing closed"
    )
    topic_template: str = DEFAULT_TEMPLATE
    secret_key: SecretStr | None = Field(default=None, description="HMAC key for client secrets (>= 32 bytes)")
    secret_key_file: Path | None = Field(default=None, description="default: beside the sqlite database")
    cache: CacheSettings = CacheSettings()
    decision_log: DecisionLogSettings = DecisionLogSettings()
    http: HttpSettings = HttpSettings()
    evaluator: EvaluatorSettings = EvaluatorSettings()
    webhook: WebhookSettings = WebhookSettings()
    brokers: BrokerSettings = BrokerSettings()
    client_ids: ClientIdSettings = ClientIdSettings()
    revocation: RevocationSettings = RevocationSettings()

    @field_validator("topic_template")
    @classmethod
    def _template(cls, value: str) -> str:
        TopicTemplate(value)  # raises ValueError with the reason
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments win over the environment, which wins over the config file. pydantic-settings
        # deep-merges the sources, so `AUTHHOOK_CACHE__ENABLED` overrides one key of the file's `cache:`
        # section and keeps the others.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _CONFIG_FILE.get()
        if config_file is not None:
            if config_file.suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
            else:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    # -- derived paths ------------------------------------------------------------------------
    def sqlite_path(self) -> Path | None:
        """The database file when the store is an on-disk sqlite database."""
        from authhook.store.sqlite import path_from_url

        if not self.store_url.startswith("sqlite://"):
            return None
        path = path_from_url(self.store_url)
        return None if path == ":memory:" else Path(path)

    def resolved_decision_log_path(self) -> Path | None:
        if not self.decision_log.enabled:
            return None
        if self.decision_log.path is not None:
            return self.decision_log.path
        db = self.sqlite_path()
        return db.with_name(db.name + ".decisions.jsonl") if db is not None else None

    def store_url_for_logs(self) -> str:
        """The store URL with any password replaced, for log lines and status output."""
        parts = urlsplit(self.store_url)
        if parts.password is None:
            return self.store_url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    def resolved_secret_key_file(self) -> Path | None:
        if self.secret_key_file is not None:
            return self.secret_key_file
        db = self.sqlite_path()
        return db.with_name(db.name + ".key") if db is not None else None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file `{path}`: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file `{path}` is not valid: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file `{path}` must hold a mapping")
    return data


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional file, the environment and explicit overrides (None = unset)."""
    from pydantic import ValidationError

    if config_file is not None:
        _read_config_file(config_file)  # unreadable, unparsable or not a mapping: one clear error first
    token = _CONFIG_FILE.set(config_file)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc
    finally:
        _CONFIG_FILE.reset(token)
