"""`crossfed deploy provision`: idempotent PKI + startup kits whose tokens and credentials the
server's own credential store accepts, kits that hold only their own secrets, clear errors."""

from __future__ import annotations

import inspect
import os
import stat
from pathlib import Path

import pytest
import yaml
from crossfed.client.enrollment import CREDENTIAL_FILE
from crossfed.common.crypto.certificates import load_certificate, verify_certificate
from crossfed.common.crypto.identity import (
    ClientCredential,
    EnrollmentError,
    PrincipalRole,
    create_admin_credential,
    enroll,
)
from crossfed.server.credential_store import CREDENTIALS_DB, SqliteCredentialStore
from typer.testing import CliRunner

from crossfed.cli import app
from crossfed.provisioning import (
    ADMIN_CREDENTIAL_FILE,
    CLIENT_CONFIG_FILE,
    CLIENT_CREDENTIAL_FILE,
    PROBE_CERT_NAME,
    SERVER_OWN_ADMIN_ID,
    STATE_DIR,
    ClientAuth,
    KitSpec,
    ProvisioningError,
    ProvisionPlan,
    parse_owner,
    provision,
)


def make_plan(root: Path, auth: ClientAuth = ClientAuth.TOKEN) -> ProvisionPlan:
    return ProvisionPlan(
        pki_dir=root / "pki",
        server=KitSpec("server", root / "server"),
        server_dns=("server",),
        clients=(KitSpec("edge-text", root / "text"), KitSpec("edge-both", root / "both")),
        admins=(KitSpec("operator", root / "admin"),),
        client_auth=auth,
    )


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(f"{CREDENTIALS_DB}-")
    }


def open_store(plan: ProvisionPlan) -> SqliteCredentialStore:
    return SqliteCredentialStore(plan.server.root / STATE_DIR / CREDENTIALS_DB)


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    first = provision(plan)
    assert first.created and not first.kept
    before = files_under(tmp_path)
    second = provision(plan)
    assert second.created == [] and len(second.kept) == len(first.created)
    after = files_under(tmp_path)
    assert {k: v for k, v in after.items() if not k.endswith(".db")} == {
        k: v for k, v in before.items() if not k.endswith(".db")
    }


def test_kits_hold_only_their_own_secrets(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    provision(plan)
    text = sorted(
        str(p.relative_to(plan.clients[0].root)) for p in plan.clients[0].root.rglob("*.*")
    )
    assert text == [
        "kit/client.yaml",
        "kit/tls/ca.crt",
        "kit/tls/client/edge-text.crt",
        "kit/tls/client/edge-text.key",
    ]
    server_keys = sorted(p.name for p in plan.server.root.rglob("*.key"))
    assert server_keys == [f"{PROBE_CERT_NAME}.key", "server.key"]
    for kit in (plan.server, *plan.clients, *plan.admins):
        assert not list(kit.root.rglob("ca.key"))
        for secret in [
            *kit.root.rglob("*.key"),
            *kit.root.rglob("*.yaml"),
            *kit.root.rglob("*.json"),
        ]:
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    ca = load_certificate(plan.pki_dir / "ca.crt")
    verify_certificate(
        load_certificate(plan.server.root / "kit/tls/server/server.crt"), ca, role="server"
    )


def test_tokens_enroll_once_against_the_servers_store(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    provision(plan)
    body = yaml.safe_load((plan.clients[0].root / CLIENT_CONFIG_FILE).read_text())
    assert body["client_id"] == "edge-text"
    store = open_store(plan)
    try:
        credential = enroll(store, body["enrollment_token"])
        assert credential.client_id == "edge-text"  # the token is bound to the kit's id
        with pytest.raises(EnrollmentError, match="already used"):
            enroll(store, body["enrollment_token"])
        admin = ClientCredential.load(plan.admins[0].root / ADMIN_CREDENTIAL_FILE)
        stored = store.get_credential("operator")
        assert stored is not None and stored.secret == admin.secret
        assert stored.role is PrincipalRole.ADMIN
    finally:
        store.close()


def test_enrolled_client_gets_no_new_token(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    state = plan.clients[0].root / STATE_DIR
    state.mkdir(parents=True)
    ClientCredential("edge-text", b"s" * 32).save(state / CREDENTIAL_FILE)
    report = provision(plan)
    assert not (plan.clients[0].root / CLIENT_CONFIG_FILE).exists()
    assert (plan.clients[1].root / CLIENT_CONFIG_FILE).exists()
    assert any("edge-text is enrolled already" in line for line in report.kept)


def test_credential_mode_pre_enrolls(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, ClientAuth.CREDENTIAL)
    provision(plan)
    credential = ClientCredential.load(plan.clients[1].root / CLIENT_CREDENTIAL_FILE)
    assert credential.client_id == "edge-both"
    assert not (plan.clients[1].root / CLIENT_CONFIG_FILE).exists()
    store = open_store(plan)
    try:
        stored = store.get_credential("edge-both")
        assert stored is not None and stored.secret == credential.secret
    finally:
        store.close()


def test_the_servers_own_admin_principal_cannot_be_a_kit(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    bad = ProvisionPlan(plan.pki_dir, plan.server, admins=(KitSpec("admin", tmp_path / "a"),))
    with pytest.raises(ProvisioningError, match="re-keys its own 'admin'"):
        provision(bad)
    # the reason: the server creates/re-keys this id for itself
    default = inspect.signature(create_admin_credential).parameters["admin_id"].default
    assert default == SERVER_OWN_ADMIN_ID


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        ((KitSpec("same", Path("a")), KitSpec("same", Path("b"))), "repeated: same"),
        ((KitSpec("bad name", Path("a")),), "invalid name"),
    ],
)
def test_bad_plans_are_refused_before_writing(
    tmp_path: Path, clients: tuple[KitSpec, ...], message: str
) -> None:
    plan = ProvisionPlan(tmp_path / "pki", KitSpec("server", tmp_path / "s"), clients=clients)
    with pytest.raises(ProvisioningError, match=message):
        provision(plan)
    assert not (tmp_path / "pki").exists()


def test_command_line_forms_are_checked() -> None:
    assert KitSpec.parse("edge=/kits/edge") == KitSpec("edge", Path("/kits/edge"))
    assert parse_owner("10001:10002") == (10001, 10002)
    for text in ("edge", "=/x", "edge="):
        with pytest.raises(ProvisioningError, match="NAME=DIR"):
            KitSpec.parse(text)
    with pytest.raises(ProvisioningError, match="UID:GID"):
        parse_owner("crossfed")


def test_cli_reports_one_line_errors_and_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["deploy", "provision", "--pki", str(tmp_path / "p"), "--server-kit", str(tmp_path)]
    result = runner.invoke(app, [*args, "--client", "no-equals-sign"])
    assert result.exit_code == 2
    assert "expected NAME=DIR" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, [*args, "--client-auth", "password"])
    assert result.exit_code == 2 and "expected 'token' or 'credential'" in result.output
    result = runner.invoke(app, [*args, "--client", f"edge={tmp_path / 'e'}"])
    assert result.exit_code == 0, result.output
    assert "provisioned:" in result.output


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another user needs root")
def test_chown_hands_kits_to_the_image_user(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    owned = ProvisionPlan(**{**plan.__dict__, "owner": (10001, 10002)})
    provision(owned)
    for kit in (plan.server, *plan.clients, *plan.admins):
        for path in [kit.root, *kit.root.rglob("*")]:
            assert (path.stat().st_uid, path.stat().st_gid) == (10001, 10002), path
    assert (tmp_path / "pki" / "ca.key").stat().st_uid == 0  # the CA stays the operator's
