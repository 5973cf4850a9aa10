"""`crossfed deploy ...`: what containers need around the server and client commands:
`provision` (idempotent CA + per-service startup kits, the compose/Kubernetes init job) and
`health-probe` (gRPC health check for HEALTHCHECK / exec probes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Deployment helpers: provision startup kits, probe server health.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("provision")
def provision_command(
    pki: Annotated[
        Path, typer.Option("--pki", help="Operator's CA directory (holds ca.key; init job only).")
    ],
    server_kit: Annotated[
        Path, typer.Option("--server-kit", help="Server volume root (gets kit/tls, state/).")
    ],
    server_name: Annotated[
        str, typer.Option("--server-name", help="Server certificate name.")
    ] = "server",
    server_dns: Annotated[
        list[str] | None,
        typer.Option("--server-dns", help="Extra DNS SAN (service name; repeatable)."),
    ] = None,
    server_ip: Annotated[
        list[str] | None, typer.Option("--server-ip", help="Extra IP SAN (repeatable).")
    ] = None,
    client: Annotated[
        list[str] | None, typer.Option("--client", help="NAME=DIR client kit (repeatable).")
    ] = None,
    admin: Annotated[
        list[str] | None, typer.Option("--admin", help="NAME=DIR admin kit (repeatable).")
    ] = None,
    client_auth: Annotated[
        str,
        typer.Option(
            "--client-auth",
            help="token: one-time enrollment token (client enrolls on first start); "
            "credential: pre-issued credential (stateless pods).",
        ),
    ] = "token",
    token_ttl_s: Annotated[
        float | None, typer.Option("--token-ttl-s", help="Enrollment tokens expire after this.")
    ] = None,
    chown: Annotated[
        str | None, typer.Option("--chown", help="UID:GID to hand the kits to (when root).")
    ] = None,
) -> None:
    """Create the CA, certificates, tokens and credentials that are missing (idempotent)."""
    from crossfed.provisioning import (
        ClientAuth,
        KitSpec,
        ProvisioningError,
        ProvisionPlan,
        parse_owner,
        provision,
    )

    try:
        try:
            auth = ClientAuth(client_auth)
        except ValueError:
            raise ProvisioningError(
                f"--client-auth {client_auth!r}: expected 'token' or 'credential'"
            ) from None
        plan = ProvisionPlan(
            pki_dir=pki,
            server=KitSpec(server_name, server_kit),
            server_dns=tuple(server_dns or ()),
            server_ips=tuple(server_ip or ()),
            clients=tuple(KitSpec.parse(item) for item in client or ()),
            admins=tuple(KitSpec.parse(item) for item in admin or ()),
            client_auth=auth,
            token_ttl_s=token_ttl_s,
            owner=parse_owner(chown) if chown else None,
        )
        report = provision(plan)
    except ProvisioningError as exc:
        typer.echo(f"crossfed deploy provision: {exc}", err=True)
        raise typer.Exit(2) from None
    for line in report.lines():
        typer.echo(line)
    typer.echo(f"provisioned: {len(report.created)} created, {len(report.kept)} already present")


@app.command("health-probe")
def health_probe_command(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Server's YAML/TOML config (env CROSSFED_* applies)."),
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="host:port (default: the server's listen).")
    ] = None,
    insecure: Annotated[
        bool | None,
        typer.Option("--insecure/--tls", help="Plaintext or TLS (default: as the server)."),
    ] = None,
    cert_dir: Annotated[
        Path | None, typer.Option("--cert-dir", help="Certificates dir (default: the server's).")
    ] = None,
    client_cert: Annotated[
        str | None,
        typer.Option("--client-cert", help="Client cert name for mTLS (default when mtls on)."),
    ] = None,
    service: Annotated[str, typer.Option("--service", help="Health service name.")] = "",
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="Call deadline.")] = 3.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Exit status only.")] = False,
) -> None:
    """Exit 0 when the server reports SERVING, 1 when not (or unreachable), 2 on bad input."""
    from dataclasses import replace

    from crossfed.common.config import ConfigError, ServerConfig, load_config
    from crossfed.health_probe import (
        HealthProbeError,
        check_health,
        dial_address,
        target_from_config,
    )
    from crossfed.provisioning import PROBE_CERT_NAME

    try:
        target = target_from_config(load_config(ServerConfig, config), PROBE_CERT_NAME)
        if address is not None:
            target = replace(target, address=dial_address(address))
        if insecure is not None:
            target = replace(target, insecure=insecure)
        if cert_dir is not None:
            target = replace(target, cert_dir=cert_dir)
        if client_cert is not None:
            target = replace(target, client_cert=client_cert)
        target = replace(target, service=service)
        result = check_health(target, timeout_s=timeout_s)
    except (ConfigError, HealthProbeError) as exc:
        typer.echo(f"crossfed deploy health-probe: {exc}", err=True)
        raise typer.Exit(2) from None
    if not quiet:
        suffix = f": {result.detail}" if result.detail else ""
        typer.echo(f"{target.address} {result.status}{suffix}", err=not result.healthy)
    raise typer.Exit(0 if result.healthy else 1)
