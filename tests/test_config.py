"""Settings: file < environment < explicit arguments, validated once, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from authhook.config import load_settings
from authhook.errors import ConfigError


def test_file_then_environment_then_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "authhook.yaml"
    config.write_text(
        "store_url: sqlite:///from-file.db\ncache:\n  allow_ttl_s: 30\n  deny_ttl_s: 3\nhttp:\n  port: 9001\n"
    )
    settings = load_settings(config)
    assert settings.store_url == "sqlite:///from-file.db"
    assert (settings.cache.allow_ttl_s, settings.cache.deny_ttl_s, settings.http.port) == (30, 3, 9001)
    monkeypatch.setenv("AUTHHOOK_STORE_URL", "sqlite:///from-env.db")
    monkeypatch.setenv("AUTHHOOK_HTTP__PORT", "9002")
    settings = load_settings(config)
    assert settings.store_url == "sqlite:///from-env.db"
    assert settings.http.port == 9002
    assert load_settings(config, store_url="sqlite:///from-flag.db").store_url == "sqlite:///from-flag.db"


def test_toml_files_work_too(tmp_path: Path) -> None:
    config = tmp_path / "authhook.toml"
    config.write_text('topic_template = "tenants/{tenant}/channels/{channel}/{subtopic}"\n')
    assert load_settings(config).topic_template.startswith("tenants/")


def test_paths_derive_from_the_sqlite_file() -> None:
    settings = load_settings(store_url="sqlite:////var/lib/authhook/main.db")
    assert str(settings.resolved_decision_log_path()) == "/var/lib/authhook/main.db.decisions.jsonl"
    assert str(settings.resolved_secret_key_file()) == "/var/lib/authhook/main.db.key"
    memory = load_settings(store_url="sqlite://:memory:")
    assert memory.resolved_decision_log_path() is None and memory.resolved_secret_key_file() is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cache:\n  maxsize: 0\n", "maxsize"),
        ("topic_template: m/{channel}\n", "topic_template"),
        ("no_such_setting: 1\n", "no_such_setting"),
        ("- a list\n", "must hold a mapping"),
        ("store_url: [unclosed\n", "is not valid"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(config)


@pytest.mark.parametrize("token", ["s3cret with space", "s3cret-tökén", "", "s3cret\ttab"])
def test_a_webhook_token_that_is_not_printable_ascii_is_refused_without_echoing_it(token: str) -> None:
    with pytest.raises(ConfigError, match="printable ASCII") as refused:
        load_settings(webhook={"token": token})
    assert token not in str(refused.value) or token == ""


def test_unsupported_store_urls_are_refused() -> None:
    from authhook.store import create_store

    with pytest.raises(ConfigError, match="unsupported store url"):
        create_store("mysql://x")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://authhook:s3cret@db.internal:5433/authz?schema=a",
            "postgresql://authhook:***@db.internal:5433/authz?schema=a",
        ),
        ("postgresql://authhook:s3cret@[::1]/authz", "postgresql://authhook:***@[::1]/authz"),
        ("postgresql://authhook@db.internal/authz", "postgresql://authhook@db.internal/authz"),
        ("sqlite:///authhook.db", "sqlite:///authhook.db"),
    ],
)
def test_the_store_url_is_logged_without_its_password(url: str, shown: str) -> None:
    assert load_settings(store_url=url).store_url_for_logs() == shown


def test_an_environment_override_of_one_nested_key_keeps_the_rest_of_the_files_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "authhook.yaml"
    config.write_text("cache:\n  maxsize: 7\n  allow_ttl_s: 30\nhttp:\n  port: 9001\n  max_body_bytes: 2048\n")
    monkeypatch.setenv("AUTHHOOK_CACHE__ENABLED", "false")
    monkeypatch.setenv("AUTHHOOK_HTTP__PORT", "9002")
    settings = load_settings(config)
    assert (settings.cache.enabled, settings.cache.maxsize, settings.cache.allow_ttl_s) == (False, 7, 30)
    assert (settings.http.port, settings.http.max_body_bytes) == (9002, 2048)


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_a_variable_named_like_a_longer_key_does_not_drop_a_shorter_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    # AUTHHOOK_SECRET_KEY_FILE starts with AUTHHOOK_SECRET_KEY: the file's secret_key must survive it, or a
    # fresh key file would be created and every stored client secret would stop verifying.
    config = tmp_path / f"authhook{suffix}"
    key = "k" * 64
    config.write_text(f"secret_key: {key}\n" if suffix == ".yaml" else f'secret_key = "{key}"\n')
    monkeypatch.setenv("AUTHHOOK_SECRET_KEY_FILE", str(tmp_path / "other.key"))
    settings = load_settings(config)
    assert settings.secret_key is not None and settings.secret_key.get_secret_value() == key
    assert settings.secret_key_file == tmp_path / "other.key"


def test_arguments_beat_the_environment_which_beats_the_file_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "authhook.toml"
    config.write_text('store_url = "sqlite:///file.db"\n[cache]\nmaxsize = 5\ndeny_ttl_s = 2.0\n')
    monkeypatch.setenv("AUTHHOOK_CACHE__MAXSIZE", "6")
    settings = load_settings(config, store_url="sqlite:///flag.db")
    assert (settings.store_url, settings.cache.maxsize, settings.cache.deny_ttl_s) == ("sqlite:///flag.db", 6, 2.0)
