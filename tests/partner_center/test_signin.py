"""Sign-in: real msal against the identity-provider twin, the documented ROPC answer, the CLI."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import respx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from connector.cli.auth import app
from connector.errors import ConfigError, SignInRequired
from connector.remote.http import http_client
from connector.remote.idp_twin import IdpTwin
from connector.remote.signin import ClientCredentials, DelegatedSignIn, TokenCacheFile, token_cache_path
from connector.settings import Settings

from .conftest import CLIENT_ID, CONNECTION, PASSWORD, USER, fixture_json

SCOPES = ["https://api.partner.microsoft.com/.default"]


def test_device_code_login_persists_a_private_cache_and_status_shows_no_token(
    settings: Settings, sign_in: Callable[[Settings], None], idp: IdpTwin
) -> None:
    sign_in(settings)
    cache = token_cache_path(settings, CONNECTION)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    result = CliRunner().invoke(app, ["status", "--config", str(settings.config_file)])
    assert result.exit_code == 0, result.output
    assert f"signed in as {USER}" in result.output and "refresh token last used: 2" in result.output
    assert "idp-at-" not in result.output and "idp-rt-" not in result.output


def test_cli_login_with_device_code(settings: Settings, idp: IdpTwin) -> None:
    idp.auto_approve = USER
    result = CliRunner().invoke(
        app, ["login", "--connection", CONNECTION, "--config", str(settings.config_file)]
    )
    assert result.exit_code == 0, result.output
    assert "enter the code" in result.output and f"signed in as {USER}" in result.output
    assert "idp-" not in result.output


def test_cli_status_before_sign_in(settings: Settings, idp: IdpTwin) -> None:
    result = CliRunner().invoke(app, ["status", "-n", CONNECTION, "--config", str(settings.config_file)])
    assert result.exit_code == 1 and "not signed in" in result.output and "cosell auth login" in result.output
    assert idp.requests == [] and not settings.data_dir.exists()


def test_cli_unknown_connection(settings: Settings) -> None:
    result = CliRunner().invoke(app, ["login", "-n", "globex", "--config", str(settings.config_file)])
    assert isinstance(result.exception, ConfigError) and "unknown connection" in str(result.exception)
    assert not settings.data_dir.exists()


def test_password_mode_warns_about_mfa_and_refuses_mfa_users(
    write_config: Callable[..., Settings],
    idp: IdpTwin,
    settings: Settings,
    ca_pem: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    idp.add_user("mfa@partner.example", "pw", mfa_required=True)
    monkeypatch.setenv("COSELL_CONNECTIONS__ACME__PARTNER_CENTER__AUTH__PASSWORD", PASSWORD)
    ok = write_config(
        authority=idp.authority,
        base_url="https://x.example/v1.0",
        ca_bundle=ca_pem,
        mode="password",
        username=USER,
    )
    result = CliRunner().invoke(app, ["login", "-n", CONNECTION, "--config", str(ok.config_file)])
    assert result.exit_code == 0, result.output
    assert "multi-factor" in result.output and f"signed in as {USER}" in result.output
    # msal asked the user realm first, on the authority's own port (partner-center-api.md §9)
    assert idp.calls("GET", "/common/userrealm/")

    monkeypatch.setenv("COSELL_CONNECTIONS__ACME__PARTNER_CENTER__AUTH__PASSWORD", "pw")
    mfa = write_config(
        authority=idp.authority,
        base_url="https://x.example/v1.0",
        ca_bundle=ca_pem,
        mode="password",
        username="mfa@partner.example",
    )
    result = CliRunner().invoke(app, ["login", "-n", CONNECTION, "--config", str(mfa.config_file)])
    assert isinstance(result.exception, SignInRequired)
    assert "multi-factor" in str(result.exception) and "device_code" in str(result.exception)


def test_documented_ropc_answer_with_string_numbers_is_accepted(tmp_path: Path) -> None:
    authority = "https://login.partner.test/tenant1"
    with respx.mock() as idp:
        idp.get(f"{authority}/v2.0/.well-known/openid-configuration").mock(
            return_value=httpx.Response(
                200,
                json={
                    "issuer": f"{authority}/v2.0",
                    "authorization_endpoint": f"{authority}/oauth2/v2.0/authorize",
                    "token_endpoint": f"{authority}/oauth2/v2.0/token",
                },
            )
        )
        idp.get(url__startswith="https://login.partner.test/common/userrealm/").mock(
            return_value=httpx.Response(200, json={"account_type": "Managed"})
        )
        token = idp.post(f"{authority}/oauth2/v2.0/token").mock(
            return_value=httpx.Response(200, json=fixture_json("token-response-ropc.json"))
        )
        signin = DelegatedSignIn(
            connection=CONNECTION,
            authority=authority,
            client_id=CLIENT_ID,
            scopes=SCOPES,
            cache=TokenCacheFile(tmp_path / "cache.json"),
            http=http_client(None),
            mode="password",
            username=USER,
            password=PASSWORD,
            client_secret="app-secret",
        )
        try:
            assert signin.token() == "token-value-removed"
        finally:
            signin.close()
    form = dict(httpx.QueryParams(token.calls[0].request.content.decode()))
    assert form["grant_type"] == "password" and form["client_secret"] == "app-secret"


def test_client_credentials_with_secret_and_forced_refresh(idp: IdpTwin, ca_pem: Path) -> None:
    idp.add_client("dataverse-app", secret="s3cret")
    provider = ClientCredentials(
        authority=idp.authority,
        client_id="dataverse-app",
        scopes=["https://org.crm.example/.default"],
        http=http_client(ca_pem),
        secret="s3cret",
    )
    try:
        first, cached, fresh = provider.token(), provider.token(), provider.token(force_refresh=True)
    finally:
        provider.close()
    assert first == cached != fresh
    assert idp.counters.token_requests["client_credentials"] == 2
    issued = idp.validate(f"Bearer {fresh}")
    assert issued is not None and issued.app_only


def test_client_credentials_with_certificate(idp: IdpTwin, ca_pem: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cosell")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(idp.clock.now())
        .not_valid_after(idp.clock.now().replace(year=2030))
        .sign(key, hashes.SHA256())
    )
    idp.add_client(
        "cert-app",
        public_key_pem=key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    provider = ClientCredentials(
        authority=idp.authority,
        client_id="cert-app",
        scopes=["https://org.crm.example/.default"],
        http=http_client(ca_pem),
        private_key_pem=pem.decode(),
        thumbprint=cert.fingerprint(hashes.SHA1()).hex(),  # noqa: S303 - x5t is SHA-1 by spec
    )
    try:
        assert idp.validate(f"Bearer {provider.token()}") is not None
    finally:
        provider.close()


def test_client_credentials_bad_secret_is_a_config_error(idp: IdpTwin, ca_pem: Path) -> None:
    idp.add_client("dataverse-app", secret="s3cret")
    provider = ClientCredentials(
        authority=idp.authority,
        client_id="dataverse-app",
        scopes=["https://org.crm.example/.default"],
        http=http_client(ca_pem),
        secret="wrong",
    )
    try:
        with pytest.raises(ConfigError, match="check the client id, secret or certificate"):
            provider.token()
    finally:
        provider.close()


def test_a_delegated_token_is_handed_out_from_memory_until_near_expiry(
    settings: Settings, sign_in: Callable[[Settings], None], idp: IdpTwin, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connector.remote import signin as signin_module
    from connector.remote.signin import partner_center_signin

    sign_in(settings)
    provider = partner_center_signin(settings, CONNECTION)
    try:
        first = provider.token()
        reads = [0]
        original = TokenCacheFile.refresh

        def counting(self: TokenCacheFile) -> None:
            reads[0] += 1
            original(self)

        monkeypatch.setattr(TokenCacheFile, "refresh", counting)
        assert [provider.token() for _ in range(50)] == [first] * 50
        assert reads[0] == 0  # no cache file read, no msal lookup per request
        # a 401 forces a refresh: a new token from the identity provider
        assert provider.token(force_refresh=True) != first and reads[0] == 1
        # near its expiry the remembered token is no longer handed out
        now = signin_module.time.monotonic()
        monkeypatch.setattr(signin_module.time, "monotonic", lambda: now + 3600)
        provider.token()
        assert reads[0] == 2
    finally:
        provider.close()
