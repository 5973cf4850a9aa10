"""Certificates: CA + role certificates, file modes, verification, CLI errors."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from crossfed.common.crypto.certificates import (
    CertificateError,
    CertificateLayout,
    Role,
    certificate_fingerprint,
    certificate_name,
    certificate_role,
    create_ca,
    issue_certificate,
    load_certificate,
    load_private_key,
    verify_certificate,
)
from crossfed.common.crypto.certs_cli import app
from cryptography import x509
from typer.testing import CliRunner


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_and_server_certificate_layout_modes_and_sans(tmp_path: Path) -> None:
    ca = create_ca(tmp_path)
    paths = issue_certificate(
        tmp_path, "server", "coord", dns_names=["fl.example.org"], ip_addresses=["10.0.0.7"]
    )
    assert paths == CertificateLayout(tmp_path).pair(Role.SERVER, "coord")
    assert _mode(ca.key) == 0o600 and _mode(paths.key) == 0o600
    assert _mode(ca.cert) == 0o644 and _mode(paths.cert) == 0o644
    cert = load_certificate(paths.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert {"coord", "localhost", "fl.example.org"} <= set(dns)
    assert {"127.0.0.1", "::1", "10.0.0.7"} <= set(ips)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert certificate_role(cert) is Role.SERVER and certificate_name(cert) == "coord"
    verify_certificate(cert, load_certificate(ca.cert), role="server")
    assert len(certificate_fingerprint(cert)) == 64
    load_private_key(paths.key)


def test_client_cert_has_client_auth_and_wrong_role_is_rejected(tmp_path: Path) -> None:
    ca = create_ca(tmp_path)
    paths = issue_certificate(tmp_path, Role.CLIENT, "hospital-1")
    cert = load_certificate(paths.cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    with pytest.raises(CertificateError, match="client certificate; expected admin"):
        verify_certificate(cert, load_certificate(ca.cert), role=Role.ADMIN)


def test_verify_rejects_foreign_ca_and_expired(tmp_path: Path) -> None:
    create_ca(tmp_path / "a")
    other = create_ca(tmp_path / "b")
    cert = load_certificate(issue_certificate(tmp_path / "a", "client", "c1").cert)
    with pytest.raises(CertificateError, match="not issued by this CA"):
        verify_certificate(cert, load_certificate(other.cert))
    ca_cert = load_certificate(tmp_path / "a" / "ca.crt")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=10_000)
    with pytest.raises(CertificateError, match="expired"):
        verify_certificate(cert, ca_cert, now=later)


def test_refuses_overwrite_without_force_and_bad_inputs(tmp_path: Path) -> None:
    create_ca(tmp_path)
    first = load_certificate(tmp_path / "ca.crt")
    with pytest.raises(CertificateError, match="already exists"):
        create_ca(tmp_path)
    create_ca(tmp_path, force=True)
    assert load_certificate(tmp_path / "ca.crt").serial_number != first.serial_number
    with pytest.raises(CertificateError, match="unknown role"):
        issue_certificate(tmp_path, "superuser", "x")
    with pytest.raises(CertificateError, match="invalid name"):
        issue_certificate(tmp_path, "client", "../evil")
    with pytest.raises(CertificateError, match="invalid IP"):
        issue_certificate(tmp_path, "server", "s", ip_addresses=["300.1.1.1"])
    with pytest.raises(CertificateError, match="invalid DNS"):
        issue_certificate(tmp_path, "server", "s", dns_names=["bad name"])
    with pytest.raises(CertificateError, match="not found"):
        issue_certificate(tmp_path / "empty", "client", "c")


def test_world_readable_key_is_refused(tmp_path: Path) -> None:
    create_ca(tmp_path)
    key = issue_certificate(tmp_path, "client", "c").key
    key.chmod(0o644)
    with pytest.raises(CertificateError, match="chmod 600"):
        load_private_key(key)


def test_cli_init_issue_and_readable_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    d = str(tmp_path / "certs")
    ok = runner.invoke(app, ["init", "--dir", d])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, ["init", "--dir", d])
    assert again.exit_code != 0
    assert "error:" in again.output and "--force" in again.output
    assert "Traceback" not in again.output
    issued = runner.invoke(app, ["issue", "server", "srv", "--dir", d, "--dns", "a.example"])
    assert issued.exit_code == 0, issued.output
    assert (tmp_path / "certs" / "server" / "srv.key").exists()
    bad_role = runner.invoke(app, ["issue", "root", "x", "--dir", d])
    assert bad_role.exit_code != 0 and "unknown role 'root'" in bad_role.output
    no_ca = runner.invoke(app, ["issue", "client", "x", "--dir", str(tmp_path / "none")])
    assert no_ca.exit_code != 0 and "not found" in no_ca.output
