"""The HTTP services speak TLS when given a certificate (the seed's 'TLS/HTTPS or WSS')."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ingest.wiring import build
from sealstream.settings import HttpSettings, Settings
from tests.e2e.conftest import free_port


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_gateway_serves_https_only_when_given_a_certificate(
    settings: Settings, database: object, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    http = HttpSettings(port=free_port(), tls_cert=cert, tls_key=key)
    assert http.tls
    app, close = build(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=http.port,
            log_config=None,
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        trust = ssl.create_default_context(cafile=str(cert))
        response = httpx.get(f"https://127.0.0.1:{http.port}/healthz", verify=trust)
        assert response.status_code == 200
        # The same port refuses plaintext HTTP: nothing travels unencrypted.
        try:
            plain = httpx.get(f"http://127.0.0.1:{http.port}/healthz", timeout=2)
            assert plain.status_code != 200
        except httpx.HTTPError:
            pass
    finally:
        server.should_exit = True
        thread.join(10)
        close()
