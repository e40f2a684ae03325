"""gunicorn serving the app over TLS from its own certificate, configured from the environment."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import base_env, build_app
from tests.servers import gunicorn_process


def self_signed_pair(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_gunicorn_serves_https_with_hsts(sqlite_url: str, tmp_path: Path) -> None:
    build_app(sqlite_url)  # the schema the server will use
    cert, key = self_signed_pair(tmp_path)
    env = base_env(sqlite_url, GUNICORN_CERTFILE=str(cert), GUNICORN_KEYFILE=str(key))

    with gunicorn_process(
        "wsgi:app", env, workers=1, scheme="https", probe_path="/health"
    ) as served:
        url = served.url
        response = requests.post(f"{url}/api/v1/generate-uuid", verify=str(cert), timeout=10)
        plain = None
        try:
            requests.get(url.replace("https://", "http://") + "/health", timeout=5)
        except requests.ConnectionError as exc:
            plain = exc

    assert response.status_code == 200
    assert response.json()["status"] == "success"
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    assert plain is not None, "plain HTTP must not be served on the TLS port"
