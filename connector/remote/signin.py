"""Sign-in through msal, shared by every Microsoft remote: delegated user tokens for Partner Center
and client credentials for Dataverse. Both are :class:`~connector.remote.tokens.TokenProvider`\\ s.

Facts that shaped this module (crm-apis.md §C, partner-center-api.md §9):

- The Referrals API takes delegated user tokens only
  (https://learn.microsoft.com/partner-center/developer/referral-api-authentication). An operator
  signs in once with a device code (``cosell auth login``); the daemon then runs on the refresh token
  in a persisted :class:`msal.SerializableTokenCache` (file mode 0600 in the state directory, never
  logged). ROPC (username/password) is offered for service accounts in tenants without MFA only.
- msal talks HTTP through ``http_client=``: we give it an httpx client built from the connector's one
  ``tls.ca_bundle`` (requests would silently ignore it when CA env vars are set, §D).
- A non-Microsoft authority (the sandbox IdP) needs ``instance_discovery=False``.
- msal drops the authority's port when it asks ``/common/userrealm/`` during ROPC (§9): the adapter
  puts the port back for the configured authority host.
- msal caches a 400 token answer for 60 s per application object, and treats tokens with < 5 min
  left as expired; so an ``invalid_grant`` is surfaced once as :class:`SignInRequired`, never retried.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import msal
import structlog

from connector.errors import ConfigError, RetryLater, SignInRequired
from connector.remote.http import TlsTrustError, http_client, is_tls_failure, tls_hint
from connector.settings import Settings, read_secret

__all__ = [
    "MICROSOFT_AUTHORITY_HOSTS",
    "ClientCredentials",
    "DelegatedSignIn",
    "IdentityProviderUnreachable",
    "MsalHttp",
    "SignInStatus",
    "TokenCacheFile",
    "partner_center_signin",
]

log = structlog.get_logger(__name__)

#: Hosts msal knows; every other authority is validated by its own openid-configuration only.
MICROSOFT_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "login.microsoftonline.us",
        "login-us.microsoftonline.com",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
    }
)


class IdentityProviderUnreachable(RetryLater):
    """The identity provider (authority) could not be reached."""


# --- transport ---------------------------------------------------------------------------------


class MsalHttp:
    """The requests-style ``get``/``post`` msal calls, on an httpx client (which already has both;
    this adapter only maps ``data=`` text to ``content=`` and restores the authority's port)."""

    def __init__(self, client: httpx.Client, authority: str) -> None:
        self.client = client
        parts = urlsplit(authority)
        self._host = parts.hostname or ""
        self._netloc = parts.netloc

    def _url(self, url: str) -> str:
        parts = urlsplit(url)
        if parts.hostname == self._host and parts.port is None and parts.netloc != self._netloc:
            # msal builds https://{host}/common/userrealm/... without the port (partner-center-api.md §9).
            return urlunsplit(parts._replace(netloc=self._netloc))
        return url

    def get(
        self,
        url: str,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **_: Any,
    ) -> httpx.Response:
        return self.client.get(self._url(url), params=params, headers=headers)

    def post(
        self,
        url: str,
        params: Mapping[str, Any] | None = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        **_: Any,
    ) -> httpx.Response:
        if isinstance(data, str | bytes):  # WS-Trust posts raw XML; httpx wants it as content=
            return self.client.post(self._url(url), params=params, content=data, headers=headers)
        if isinstance(data, Mapping):
            # msal passes the signed client assertion as bytes; requests sends bytes form values as
            # text, httpx would send their repr (b'...').
            data = {k: v.decode("ascii") if isinstance(v, bytes) else v for k, v in data.items()}
        return self.client.post(self._url(url), params=params, data=data, headers=headers)

    def close(self) -> None:
        self.client.close()


@contextmanager
def _idp_errors(authority: str, what: str) -> Iterator[None]:
    """Turn transport and msal failures into the connector's error families, with the fix in words."""
    try:
        yield
    except httpx.TransportError as exc:
        if is_tls_failure(exc):
            host = urlsplit(authority).netloc
            raise TlsTrustError(f"{what}: identity provider: {tls_hint(host)}") from None
        raise IdentityProviderUnreachable(
            f"{what}: cannot reach the identity provider at {authority} ({type(exc).__name__}); "
            "check partner_center.authority and the network",
            system="signin",
        ) from None
    except msal.exceptions.MsalServiceError as exc:
        raise IdentityProviderUnreachable(
            f"{what}: the identity provider at {authority} failed ({exc})", system="signin"
        ) from None
    except ValueError as exc:  # msal: the authority's openid-configuration is missing or refused
        raise ConfigError(f"{what}: the authority {authority} was not accepted: {exc}") from None


def _instance_discovery(authority: str) -> bool | None:
    return None if urlsplit(authority).hostname in MICROSOFT_AUTHORITY_HOSTS else False


# --- the persisted cache -----------------------------------------------------------------------


class TokenCacheFile:
    """msal's cache as a file only the connector's user can read; written atomically, only on change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cache = msal.SerializableTokenCache()
        self._loaded_mtime: int | None = None

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def refresh(self) -> None:
        """(Re)load when the file changed on disk (``cosell auth login`` ran in another process)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        if stat.st_mtime_ns != self._loaded_mtime:
            if stat.st_mode & 0o077:
                log.warning("signin.cache_permissions_tightened", path=str(self.path))
                self.path.chmod(0o600)
            self.cache.deserialize(self.path.read_text(encoding="utf-8"))
            self._loaded_mtime = stat.st_mtime_ns

    def save(self) -> None:
        if not self.cache.has_state_changed:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.cache.serialize())
        tmp.replace(self.path)
        self.cache.has_state_changed = False
        self._loaded_mtime = self.path.stat().st_mtime_ns

    def accounts(self) -> list[dict[str, Any]]:
        return list(self.cache.search(msal.TokenCache.CredentialType.ACCOUNT))

    def refresh_token_last_used(self) -> datetime | None:
        """When a refresh token was last issued or redeemed (msal stamps each RT it stores)."""
        stamps = [
            int(rt["last_modification_time"])
            for rt in self.cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)
            if str(rt.get("last_modification_time", "")).isdigit()
        ]
        return datetime.fromtimestamp(max(stamps), UTC) if stamps else None


# --- delegated user sign-in (Partner Center) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignInStatus:
    """What ``cosell auth status`` shows: never a token."""

    connection: str
    authority: str
    mode: str
    signed_in: bool
    username: str | None = None
    refresh_token_last_used: datetime | None = None
    cache_file: Path | None = None


_MFA_HINTS = ("AADSTS50076", "AADSTS50079", "AADSTS50158", "interaction_required")


#: a remembered access token stops being handed out this many seconds before it expires
TOKEN_MEMO_MARGIN = 300.0


class DelegatedSignIn:
    """Delegated user tokens for one connection, from a persisted msal cache (device code or ROPC)."""

    def __init__(
        self,
        *,
        connection: str,
        authority: str,
        client_id: str,
        scopes: Sequence[str],
        cache: TokenCacheFile,
        http: httpx.Client,
        mode: Literal["device_code", "password"] = "device_code",
        username: str | None = None,
        password: str | None = None,
        client_secret: str | None = None,
    ) -> None:
        self.connection = connection
        self.authority = authority
        self.client_id = client_id
        self.scopes = list(scopes)
        self.cache = cache
        self.mode = mode
        self.username = username
        self._password = password
        self._client_secret = client_secret
        self._http = MsalHttp(http, authority)
        self._app: msal.ClientApplication | None = None
        self._lock = threading.Lock()
        #: the last access token and when to stop handing it out (monotonic clock)
        self._memo: tuple[str, float] | None = None

    def __repr__(self) -> str:
        return f"DelegatedSignIn(connection={self.connection!r}, mode={self.mode!r})"

    def close(self) -> None:
        self._http.close()

    @property
    def _login_hint(self) -> str:
        return f"run `cosell auth login --connection {self.connection}`"

    def _application(self) -> msal.ClientApplication:
        if self._app is None:
            with _idp_errors(self.authority, f"connection {self.connection}"):
                common: dict[str, Any] = {
                    "authority": self.authority,
                    "token_cache": self.cache.cache,
                    "http_client": self._http,
                    "instance_discovery": _instance_discovery(self.authority),
                }
                if self.mode == "password" and self._client_secret:
                    # The documented ROPC recipe sends the app's secret too (referral-api-authentication).
                    self._app = msal.ConfidentialClientApplication(
                        self.client_id, client_credential=self._client_secret, **common
                    )
                else:
                    self._app = msal.PublicClientApplication(self.client_id, **common)
        return self._app

    # --- TokenProvider --------------------------------------------------------------------------
    def token(self, *, force_refresh: bool = False) -> str:
        with self._lock:
            # Every request asks for a token: re-reading the cache file and running msal's silent
            # lookup each time was a third of an initial sync's client CPU. The token is handed out
            # from memory until five minutes before it expires; a 401 forces a refresh.
            if self._memo is not None and not force_refresh and time.monotonic() < self._memo[1]:
                return self._memo[0]
            self._memo = None
            self.cache.refresh()
            if self.mode == "device_code" and not self.cache.accounts():
                raise SignInRequired(
                    f"Partner Center sign-in for connection {self.connection} was never done: {self._login_hint}"
                )
            result = self._silent(force_refresh)
            if (result is None or _is_invalid_grant(result)) and self.mode == "password":
                result = self._password_grant()
            if result is None:
                raise SignInRequired(
                    f"no Partner Center sign-in cached for connection {self.connection}: {self._login_hint}"
                )
            return self._accept(result, "refresh")

    def _silent(self, force_refresh: bool) -> dict[str, Any] | None:
        app = self._application()
        accounts = app.get_accounts(username=self.username) if self.username else app.get_accounts()
        if not accounts:
            return None
        with _idp_errors(self.authority, f"connection {self.connection}"):
            result: dict[str, Any] | None = app.acquire_token_silent_with_error(
                self.scopes, account=accounts[0], force_refresh=force_refresh
            )
        return result

    def _accept(self, result: dict[str, Any], how: str) -> str:
        if "access_token" not in result:
            raise self._failure(result)
        self.cache.save()
        source = result.get("token_source", how)
        if source != "cache":  # a token from the cache is every request; only log the IdP round trips
            log.info(
                "signin.token", connection=self.connection, source=source, expires_in=result.get("expires_in")
            )
        token = str(result["access_token"])
        try:
            lifetime = float(result.get("expires_in") or 0)
        except (TypeError, ValueError):
            lifetime = 0.0
        if lifetime > TOKEN_MEMO_MARGIN:
            self._memo = (token, time.monotonic() + lifetime - TOKEN_MEMO_MARGIN)
        return token

    def _failure(self, result: Mapping[str, Any]) -> SignInRequired:
        error = str(result.get("error", "unknown_error"))
        description = str(result.get("error_description", ""))
        code = description.split(":", 1)[0] if description.startswith("AADSTS") else ""
        if any(h in description or h == error for h in _MFA_HINTS):
            return SignInRequired(
                f"Partner Center sign-in for connection {self.connection} needs multi-factor authentication "
                f"({code or error}); username/password sign-in cannot satisfy it. Set "
                f"partner_center.auth.mode: device_code and {self._login_hint}."
            )
        if error == "invalid_grant":
            return SignInRequired(
                f"the Partner Center sign-in for connection {self.connection} has expired or was revoked "
                f"(invalid_grant{', ' + code if code else ''}); an operator must sign in again: {self._login_hint}"
            )
        return SignInRequired(
            f"Partner Center sign-in for connection {self.connection} failed ({error}"
            f"{', ' + code if code else ''}): {self._login_hint}"
        )

    # --- operator commands ---------------------------------------------------------------------
    def login_device_code(
        self, prompt: Callable[[str], None], *, sleep: Callable[[float], None] = time.sleep
    ) -> SignInStatus:
        """Device-code sign-in: show ``prompt`` the code, poll until the user approves or it expires."""
        if self.mode != "device_code":
            raise ConfigError(f"connection {self.connection} uses partner_center.auth.mode {self.mode}")
        app = self._application()
        if not isinstance(app, msal.PublicClientApplication):  # pragma: no cover - mode guards it
            raise ConfigError("device-code sign-in needs a public client application")
        with _idp_errors(self.authority, f"connection {self.connection}"):
            flow = app.initiate_device_flow(scopes=self.scopes)
            if "user_code" not in flow:
                raise self._failure(flow)
            prompt(str(flow["message"]))
            while True:
                # One poll per call (exit_condition) so the wait between polls is ours and injectable;
                # msal's own "attempted too soon" check measures wall time and so is silenced here.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Attempted too soon", category=UserWarning)
                    result = app.acquire_token_by_device_flow(flow, exit_condition=lambda _flow: True)
                if result.get("error") not in ("authorization_pending", "slow_down"):
                    break
                if time.time() >= float(flow.get("expires_at", 0)):
                    raise SignInRequired(
                        f"the device code for connection {self.connection} expired: try again"
                    )
                sleep(float(flow.get("interval", 5)))  # msal adds 5 s to it on slow_down
        with self._lock:
            self._accept(result, "device_code")
        return self.status()

    def login_password(self) -> SignInStatus:
        """ROPC sign-in with the configured service account (no MFA possible; see the module doc)."""
        with self._lock:
            result = self._password_grant()
            self._accept(result, "password")
        return self.status()

    def _password_grant(self) -> dict[str, Any]:
        if not (self.username and self._password):
            raise ConfigError(
                f"connection {self.connection}: partner_center.auth.mode password needs username and "
                "password (COSELL_CONNECTIONS__<NAME>__PARTNER_CENTER__AUTH__PASSWORD or password_file)"
            )
        log.warning(
            "signin.password_flow",
            connection=self.connection,
            note="username/password sign-in fails in tenants that enforce MFA; prefer mode device_code",
        )
        app = self._application()
        with _idp_errors(self.authority, f"connection {self.connection}"), warnings.catch_warnings():
            # msal deprecates ROPC for public clients; the warning above says the same to the operator.
            warnings.simplefilter("ignore", DeprecationWarning)
            result: dict[str, Any] = app.acquire_token_by_username_password(
                self.username, self._password, scopes=self.scopes
            )
        return result

    def status(self) -> SignInStatus:
        """Who is signed in, from the cache file alone (no network)."""
        self.cache.refresh()
        accounts = self.cache.accounts()
        return SignInStatus(
            connection=self.connection,
            authority=self.authority,
            mode=self.mode,
            signed_in=bool(accounts),
            username=str(accounts[0].get("username")) if accounts else None,
            refresh_token_last_used=self.cache.refresh_token_last_used(),
            cache_file=self.cache.path if self.cache.exists else None,
        )


def _is_invalid_grant(result: Mapping[str, Any]) -> bool:
    return result.get("error") == "invalid_grant"


def token_cache_path(settings: Settings, connection: str) -> Path:
    return settings.data_dir / "signin" / f"{connection}.partner-center.json"


def partner_center_signin(
    settings: Settings, connection: str, *, http: httpx.Client | None = None
) -> DelegatedSignIn:
    """The delegated sign-in of one configured connection (raises ConfigError for an unknown name)."""
    pc = settings.connection(connection).partner_center
    auth = pc.auth
    return DelegatedSignIn(
        connection=connection,
        authority=pc.authority,
        client_id=auth.client_id,
        scopes=auth.scopes,
        cache=TokenCacheFile(token_cache_path(settings, connection)),
        http=http or http_client(settings.tls.ca_bundle),
        mode=auth.mode,
        username=auth.username,
        password=read_secret(auth.password, auth.password_file, "partner_center.auth.password"),
        client_secret=read_secret(
            auth.client_secret, auth.client_secret_file, "partner_center.auth.client_secret"
        ),
    )


# --- client credentials (Dataverse, webhook registration) --------------------------------------


class ClientCredentials:
    """App-only tokens (``acquire_token_for_client``) with a secret or a certificate."""

    def __init__(
        self,
        *,
        authority: str,
        client_id: str,
        scopes: Sequence[str],
        http: httpx.Client,
        secret: str | None = None,
        private_key_pem: str | None = None,
        thumbprint: str | None = None,
    ) -> None:
        if bool(secret) == bool(private_key_pem):
            raise ConfigError("client credentials need exactly one of a client secret or a certificate")
        if private_key_pem and not thumbprint:
            raise ConfigError("a certificate credential needs the certificate's thumbprint")
        self.authority = authority
        self.client_id = client_id
        self.scopes = list(scopes)
        self._credential: str | dict[str, str] = (
            secret if secret else {"private_key": private_key_pem or "", "thumbprint": thumbprint or ""}
        )
        self._http = MsalHttp(http, authority)
        self._cache = msal.TokenCache()
        self._app: msal.ConfidentialClientApplication | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ClientCredentials(client_id={self.client_id!r})"

    def close(self) -> None:
        self._http.close()

    def token(self, *, force_refresh: bool = False) -> str:
        with self._lock, _idp_errors(self.authority, f"client {self.client_id}"):
            if self._app is None:
                self._app = msal.ConfidentialClientApplication(
                    self.client_id,
                    client_credential=self._credential,
                    authority=self.authority,
                    token_cache=self._cache,
                    http_client=self._http,
                    instance_discovery=_instance_discovery(self.authority),
                )
            if force_refresh:
                # acquire_token_for_client refuses force_refresh; dropping the cached token is the way.
                for at in list(self._cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
                    self._cache.remove_at(at)
            result: dict[str, Any] = self._app.acquire_token_for_client(scopes=self.scopes)
        if "access_token" not in result:
            raise ConfigError(
                f"client {self.client_id} could not get a token from {self.authority} "
                f"({result.get('error', 'unknown_error')}): check the client id, secret or certificate"
            )
        return str(result["access_token"])
