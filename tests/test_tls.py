"""Webhook protection on a real ``authhook serve``: mutual TLS refuses callers without a client certificate
signed by the configured CA, and an unprotected server refuses to listen beyond loopback."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import DEMO_WORLD, TEST_KEY


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1, a client certificate from the CA, and a stranger's."""
    d = tmp_path / "pki"
    d.mkdir()
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=authhook test CA",
        cwd=d,
    )
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(extra + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "stranger.key",
        "-out",
        "stranger.pem",
        "-days",
        "2",
        "-subj",
        "/CN=stranger",
        cwd=d,
    )
    return d


def base_command(db: Path) -> list[str]:
    return [sys.executable, "-m", "authhook", "--store", f"sqlite:///{db}"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHHOOK_")}
    return {**env, "AUTHHOOK_SECRET_KEY": TEST_KEY, **extra}


def authz(url: str, context: ssl.SSLContext) -> dict[str, object]:
    body = json.dumps({"username": "acme-thermo-1", "topic": "m/acme/c/telemetry", "action": "publish"}).encode()
    request = urllib.request.Request(f"{url}/emqx/authz", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        result: dict[str, object] = json.load(response)
        return result


def test_mutual_tls_admits_only_certificates_from_the_ca(pki: Path, tmp_path: Path) -> None:
    db = tmp_path / "tls.db"
    env = clean_env(
        AUTHHOOK_HTTP__TLS_CERT=str(pki / "server.pem"),
        AUTHHOOK_HTTP__TLS_KEY=str(pki / "server.key"),
        AUTHHOOK_HTTP__TLS_CLIENT_CA=str(pki / "ca.pem"),
    )
    subprocess.run([*base_command(db), "import", str(DEMO_WORLD)], env=env, check=True, capture_output=True, timeout=60)
    with subprocess.Popen(
        [*base_command(db), "serve", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as server:
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            assert "listening on https://127.0.0.1:" in line, line
            url = line.strip().rsplit(" ", 1)[1]

            def context(cert: str | None) -> ssl.SSLContext:
                ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
                if cert is not None:
                    ctx.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
                return ctx

            assert authz(url, context("client")) == {"result": "allow"}
            for cert in (None, "stranger"):
                with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                    authz(url, context(cert))
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=20) == 0


def test_an_unprotected_server_will_not_listen_beyond_loopback(tmp_path: Path) -> None:
    done = subprocess.run(
        [*base_command(tmp_path / "open.db"), "serve", "--host", "0.0.0.0", "--port", "0"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "needs webhook.token" in done.stderr and "Traceback" not in done.stderr
