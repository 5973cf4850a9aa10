"""`crossfed certs init|issue`: make the project CA and server/client/admin certificates."""

from __future__ import annotations

from pathlib import Path

import typer
from crossfed.common.crypto.certificates import (
    DEFAULT_CA_DAYS,
    DEFAULT_CERT_DAYS,
    CertificateError,
    create_ca,
    issue_certificate,
)

app = typer.Typer(
    name="certs",
    help="Create the project CA and TLS certificates (server, client, admin).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DIR_OPTION = typer.Option(Path("certs"), "--dir", "-d", help="Certificates directory.")
_DNS_OPTION = typer.Option([], "--dns", help="Extra DNS SAN (repeatable).")
_IP_OPTION = typer.Option([], "--ip", help="Extra IP SAN (repeatable).")


def _fail(message: str) -> None:
    """One readable error line on stderr and exit code 1."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


@app.command("init")
def init_command(
    directory: Path = _DIR_OPTION,
    common_name: str = typer.Option("crossfed project CA", help="CA subject common name."),
    days: int = typer.Option(DEFAULT_CA_DAYS, help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace an existing CA."),
) -> None:
    """Create the project CA (ca.crt, ca.key with mode 0600)."""
    try:
        paths = create_ca(directory, common_name=common_name, valid_days=days, force=force)
    except CertificateError as exc:
        _fail(str(exc))
        return
    typer.echo(f"CA certificate: {paths.cert}")
    typer.echo(f"CA private key: {paths.key} (keep it offline; never ship it to clients)")


@app.command("issue")
def issue_command(
    role: str = typer.Argument(..., help="server | client | admin"),
    name: str = typer.Argument(..., help="Certificate name (file name and subject CN)."),
    directory: Path = _DIR_OPTION,
    dns: list[str] = _DNS_OPTION,
    ip: list[str] = _IP_OPTION,
    days: int = typer.Option(DEFAULT_CERT_DAYS, help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace an existing certificate."),
) -> None:
    """Issue a certificate for ROLE called NAME, signed by the project CA."""
    try:
        paths = issue_certificate(
            directory, role, name, dns_names=dns, ip_addresses=ip, valid_days=days, force=force
        )
    except CertificateError as exc:
        _fail(str(exc))
        return
    typer.echo(f"certificate: {paths.cert}")
    typer.echo(f"private key: {paths.key}")
