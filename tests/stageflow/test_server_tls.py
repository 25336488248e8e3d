"""HTTPS for a shared tracking server: Caddy in front, mlflow server on loopback behind it."""

import datetime
import ipaddress
import json
import os

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stageflow import processes, server, tracking
from stageflow.errors import UsageError
from tests.helpers import stageflow_cli

ADMIN_PASSWORD = "a-long-admin-password"


def _self_signed(tmp_path):
    """A certificate for 127.0.0.1 and its key, as PEM files (what a team's CA would issue)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tracking.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_files_come_as_an_existing_pair(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    with pytest.raises(UsageError, match="go together"):
        server.check_tls(False, cert, None)
    with pytest.raises(UsageError, match="key.pem: no such file"):
        server.check_tls(False, cert, key)
    key.write_text("x")
    assert server.check_tls(False, cert, key) is True  # files imply --tls
    assert server.check_tls(True, None, None) is True
    assert server.check_tls(False, None, None) is False


def test_basic_auth_over_plain_http_off_loopback_is_warned_about():
    assert "plain HTTP" in server.transport_warning("0.0.0.0", auth=True, tls=False)
    assert server.transport_warning("0.0.0.0", auth=True, tls=True) is None
    assert server.transport_warning("127.0.0.1", auth=True, tls=False) is None


def test_the_internal_ca_certifies_every_name_clients_may_use_and_opens_no_other_port(tmp_path):
    info = server.ServerInfo(
        pid=1, host="0.0.0.0", port=8443, backend_store_uri="", artifacts_destination="",
        log="", tls=True, upstream_port=41000,
    )  # fmt: skip
    config = server.render_tls_caddyfile(
        info, tmp_path, tmp_path / "caddy.log", allowed_hosts="tracking.internal:8443, *.corp"
    )
    assert "https://localhost:8443, https://127.0.0.1:8443, https://tracking.internal:8443 {" in (
        config
    )
    assert "tls internal" in config
    assert "auto_https disable_redirects" in config  # no listener on port 80
    assert "admin off" in config
    assert "reverse_proxy 127.0.0.1:41000" in config
    assert "bind" not in config.split("{", 2)[2]  # 0.0.0.0: every address


@pytest.mark.slow
def test_with_tls_only_https_answers_and_a_client_trusting_the_ca_trains_with_auth(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, ADMIN_PASSWORD)
    home = tmp_path / "home"
    info = server.start(
        port=processes.free_port(), home=home, auth=True, tls=True, tie_to_parent=True
    )
    try:
        assert info.uri.startswith("https://127.0.0.1:")
        assert info.ca_cert
        assert os.path.exists(info.ca_cert)
        # The port speaks TLS only; mlflow server itself listens on loopback behind Caddy.
        plain = requests.get(f"http://127.0.0.1:{info.port}/health", timeout=10)
        assert plain.status_code == 400
        argv = processes.command_line(info.pid)
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        assert argv[argv.index("--port") + 1] == str(info.upstream_port)
        assert (
            requests.get(info.uri + tracking.API_PROBE, verify=info.ca_cert, timeout=10).status_code
            == 401
        )

        env = os.environ | {
            "MLFLOW_TRACKING_URI": info.uri,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
            "STAGEFLOW_HOME": str(tmp_path / "client"),
        }
        env.pop("MLFLOW_TRACKING_SERVER_CERT_PATH", None)
        untrusted = stageflow_cli("status", "--model", "anything", env=env)
        assert untrusted.returncode == 1
        assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in untrusted.stderr
        assert "Traceback" not in untrusted.stderr

        env["MLFLOW_TRACKING_SERVER_CERT_PATH"] = info.ca_cert
        trained = stageflow_cli(
            "train", "--data", "builtin:wine", "--target", "target", "--family", "lr",
            "--model-name", "tls-wine", "--json", env=env,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr
        assert json.loads(trained.stdout)["version"] == "1"
        status = stageflow_cli("status", "--model", "tls-wine", "--json", env=env)
        assert status.returncode == 0, status.stderr

        again = server.start(port=info.port, home=home, auth=True, tls=True)
        assert again.reused
        assert again.pid == info.pid
    finally:
        server.stop(home)
    # Stopped, though perhaps not yet reaped: this test's process is their parent.
    assert not processes.group_alive(info.proxy_pid)
    assert not processes.group_alive(info.pid)
    assert not processes.port_in_use("127.0.0.1", info.port)


@pytest.mark.slow
def test_given_certificate_files_are_what_clients_see(tmp_path):
    cert, key = _self_signed(tmp_path)
    home = tmp_path / "home"
    info = server.start(
        port=processes.free_port(), home=home, tls_cert=cert, tls_key=key, tie_to_parent=True
    )
    try:
        assert info.ca_cert is None
        answer = requests.get(info.uri + tracking.API_PROBE, verify=str(cert), timeout=10)
        assert answer.status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(info.uri + "/health", timeout=10)  # not in the system's trust store
    finally:
        server.stop(home)
    assert not processes.port_in_use("127.0.0.1", info.port)
