"""Secrets: keyed hashes for client secrets, argon2id for passwords, never stored or logged in plain."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from authhook import PDP, Reason, make_request
from authhook.credentials import SecretHasher, generate_client_secret, load_or_create_pepper
from authhook.errors import ConfigError, InvalidInput


def test_client_secrets_are_stored_as_a_keyed_hash() -> None:
    hasher = SecretHasher(b"p" * 32)
    secret = generate_client_secret()
    stored = hasher.hash_client_secret(secret)
    assert secret not in stored
    assert stored.startswith("hmac-sha256$")
    assert hasher.verify_client_secret(secret, stored)
    assert not hasher.verify_client_secret(secret + "x", stored)
    # another server key gives another hash: a stolen database alone cannot test guesses
    assert SecretHasher(b"q" * 32).hash_client_secret(secret) != stored


def test_short_client_secrets_and_short_keys_are_refused() -> None:
    with pytest.raises(InvalidInput, match="shorter than 16"):
        SecretHasher(b"p" * 32).hash_client_secret("short")
    with pytest.raises(ConfigError):
        SecretHasher(b"tiny")


async def test_passwords_use_argon2id() -> None:
    hasher = SecretHasher(b"p" * 32)
    stored = hasher.hash_password("correct horse")
    assert stored.startswith("$argon2id$")
    assert await hasher.verify_password("correct horse", stored)
    assert not await hasher.verify_password("wrong horse", stored)
    assert not await hasher.verify_password("x", "not-a-hash")


def test_the_server_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    first = load_or_create_pepper(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_pepper(path) == first
    path.write_text("short")
    with pytest.raises(ConfigError):
        load_or_create_pepper(path)


async def test_connect_with_the_right_secret_and_with_wrong_ones(demo: PDP) -> None:
    ok = await demo.authenticate("acme-thermo-1", "acme-thermo-1-demo-secret", client_id="acme-thermo-1:boiler")
    assert (ok.allowed, ok.reason) == (True, Reason.AUTHENTICATED)
    assert ok.verdict.subject_tenant == "acme"
    wrong = await demo.authenticate("acme-thermo-1", "acme-thermo-1-demo-secreT")
    assert (wrong.allowed, wrong.reason) == (False, Reason.BAD_CREDENTIALS)
    unknown = await demo.authenticate("ghost", "acme-thermo-1-demo-secret")
    assert (unknown.allowed, unknown.reason) == (False, Reason.UNKNOWN_SUBJECT)
    empty = await demo.authenticate("acme-thermo-1", "")
    assert (empty.allowed, empty.reason) == (False, Reason.BAD_CREDENTIALS)
    wildcard = await demo.authenticate("acme-#", "whatever-secret-value")
    assert (wildcard.allowed, wildcard.reason) == (False, Reason.INVALID_IDENTITY)
    user = await demo.authenticate("alice@acme.example", "alice-demo-password")
    assert user.allowed
    bad_user = await demo.authenticate("alice@acme.example", "nope")
    assert bad_user.reason is Reason.BAD_CREDENTIALS


async def test_a_disabled_client_cannot_connect_even_with_its_secret(demo: PDP) -> None:
    await demo.store.set_subject_enabled("acme-thermo-1", False)
    decision = await demo.authenticate("acme-thermo-1", "acme-thermo-1-demo-secret")
    assert (decision.allowed, decision.reason) == (False, Reason.SUBJECT_DISABLED)


async def test_secrets_appear_nowhere_in_the_database_or_the_decision_log(sqlite_demo: PDP, db_path: Path) -> None:
    demo = sqlite_demo
    await demo.authenticate("acme-thermo-1", "acme-thermo-1-demo-secret")
    await demo.authenticate("acme-thermo-1", "a-wrong-secret-attempt-123")
    await demo.authenticate("alice@acme.example", "alice-demo-password")
    await demo.authorize(make_request("publish", "acme-thermo-1", "m/acme/c/telemetry"))
    demo.decision_log.flush()
    log_path = demo.decision_log.path
    assert log_path is not None
    blobs = [log_path.read_bytes()] + [p.read_bytes() for p in db_path.parent.glob("authhook.db*")]
    for needle in (b"acme-thermo-1-demo-secret", b"a-wrong-secret-attempt-123", b"alice-demo-password"):
        assert not any(needle in blob for blob in blobs)
    assert b'"hook":"connect"' in log_path.read_bytes()
