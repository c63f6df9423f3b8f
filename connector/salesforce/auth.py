"""Salesforce sign-in: the connector fetches tokens itself, then drives simple-salesforce in direct mode.

Why not simple-salesforce's own login: every login flow there hard-codes
``https://{domain}.salesforce.com`` and direct mode never refreshes (crm-apis.md §0 rows 2-3, §A.7).
So the token call is ours — httpx through :class:`~connector.remote.session.ApiSession` (one CA
bundle, retries on 5xx, call counting) against the configurable login URL — and the adapter rebuilds
its client when this provider hands out a new token.

Flows (https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_flows.htm):

- ``jwt_bearer`` — the recommended server-to-server flow: an RS256 assertion with ``iss`` = consumer
  key, ``sub`` = username, ``aud`` = the login host, ``exp`` at most 3 minutes ahead
  (https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_jwt_flow.htm);
- ``client_credentials`` — consumer key/secret as HTTP Basic against the My Domain token URL;
- ``password`` — username-password (discouraged by Salesforce; kept for orgs that still need it).

Secrets come from :func:`connector.settings.read_secret` and never reach a log or a repr.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx
import jwt
import structlog

from connector.errors import ConfigError, ConfigProblem, FatalError, SignInRequired
from connector.remote.calls import CallCounter
from connector.remote.http import http_client
from connector.remote.retry import RetryPolicy
from connector.remote.session import ApiSession
from connector.settings import SalesforceCrm, read_secret

__all__ = ["JWT_LIFETIME", "SalesforceSignIn", "SalesforceToken", "jwt_audience"]

log = structlog.get_logger(__name__)

#: Salesforce accepts JWT assertions that expire within 3 minutes (jwt flow doc above).
JWT_LIFETIME = timedelta(minutes=3)
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass(frozen=True)
class SalesforceToken:
    """An access token and the instance it is valid for (``instance_url`` from the token response)."""

    access_token: str = field(repr=False)
    instance_url: str
    issued_at: datetime | None = None


def jwt_audience(login_url: str) -> str:
    """The ``aud`` claim for a login URL.

    Salesforce wants ``https://login.salesforce.com`` for production (My Domain logins included) and
    ``https://test.salesforce.com`` for sandboxes; any other host (an Experience Cloud site, a local
    emulator) is its own audience.
    """
    host = (urlsplit(login_url).hostname or "").lower()
    if host == "test.salesforce.com" or host.endswith(".sandbox.my.salesforce.com"):
        return "https://test.salesforce.com"
    if host == "login.salesforce.com" or host.endswith(".my.salesforce.com"):
        return "https://login.salesforce.com"
    return login_url.rstrip("/")


class SalesforceSignIn:
    """A :class:`~connector.remote.tokens.TokenProvider` for Salesforce that also knows the instance URL.

    ``token()`` returns the cached token; ``token(force_refresh=True)`` signs in again (after a 401).
    """

    def __init__(
        self,
        crm: SalesforceCrm,
        *,
        ca_bundle: Path | None = None,
        http: httpx.Client | None = None,
        policy: RetryPolicy | None = None,
        calls: CallCounter | None = None,
        audience: str | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        login = crm.login_url.rstrip("/")
        if urlsplit(login).scheme != "https":
            raise ConfigError(
                [
                    ConfigProblem(
                        "configuration",
                        "crm.login_url",
                        "must be an https:// URL",
                        "https://login.salesforce.com",
                    )
                ]
            )
        self._crm = crm
        self._token_url = f"{login}/services/oauth2/token"
        self._audience = audience or jwt_audience(login)
        self._api = ApiSession("salesforce", http or http_client(ca_bundle), policy=policy, calls=calls)
        # The JWT's exp is judged by Salesforce's clock; local time is the best we have here and
        # never feeds a cursor. Tests that move the twin clock pass the twin's now.
        self._now = now
        self._lock = threading.Lock()
        self._current: SalesforceToken | None = None
        self.sign_ins = 0

    def close(self) -> None:
        self._api.http.close()

    # --- TokenProvider ------------------------------------------------------------------------------
    def token(self, *, force_refresh: bool = False) -> str:
        return self.current(force_refresh=force_refresh).access_token

    def current(self, *, force_refresh: bool = False) -> SalesforceToken:
        with self._lock:
            if self._current is None or force_refresh:
                self._current = self._sign_in()
            return self._current

    # --- flows --------------------------------------------------------------------------------------
    def _secret(self, name: str) -> str:
        auth = self._crm.auth
        value = read_secret(getattr(auth, name), getattr(auth, f"{name}_file"), f"crm.auth.{name}")
        if not value:
            raise ConfigError(
                [
                    ConfigProblem(
                        "configuration",
                        f"crm.auth.{name}",
                        f"flow {auth.flow} needs {name.replace('_', ' ')}",
                        f"set the environment variable or crm.auth.{name}_file",
                    )
                ]
            )
        return value

    def _form(self) -> tuple[dict[str, str], dict[str, str]]:
        auth = self._crm.auth
        if auth.flow == "jwt_bearer":
            now = self._now()
            claims = {
                "iss": auth.client_id,
                "sub": auth.username or "",
                "aud": self._audience,
                "exp": int((now + JWT_LIFETIME).timestamp()),
            }
            assertion = jwt.encode(claims, self._secret("private_key"), algorithm="RS256")
            return {"grant_type": JWT_GRANT, "assertion": assertion}, {}
        if auth.flow == "client_credentials":
            secret = self._secret("client_secret")
            pair = base64.b64encode(f"{auth.client_id}:{secret}".encode()).decode("ascii")
            return {"grant_type": "client_credentials"}, {"Authorization": f"Basic {pair}"}
        return (
            {
                "grant_type": "password",
                "client_id": auth.client_id,
                "client_secret": self._secret("client_secret"),
                "username": auth.username or "",
                "password": self._secret("password"),
            },
            {},
        )

    def _sign_in(self) -> SalesforceToken:
        form, headers = self._form()
        response = self._api.request(
            "oauth-token",
            "POST",
            self._token_url,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
                **headers,
            },
            content=urlencode(form),
        )
        body = _json_or_empty(response)
        if response.status_code != 200:
            error = str(body.get("error") or f"HTTP {response.status_code}")
            described = str(body.get("error_description") or "")
            log.warning("salesforce sign-in refused", flow=self._crm.auth.flow, error=error)
            raise SignInRequired(
                [
                    ConfigProblem(
                        "salesforce",
                        "crm.auth",
                        f"sign-in with flow {self._crm.auth.flow} was refused: {error}"
                        + (f" ({described})" if described else ""),
                    )
                ]
            )
        access, instance = body.get("access_token"), body.get("instance_url")
        if not isinstance(access, str) or not isinstance(instance, str) or not access:
            raise FatalError("Salesforce token response lacks access_token or instance_url")
        if urlsplit(instance).scheme != "https":
            # simple-salesforce always speaks https to the instance (crm-apis.md §A.7)
            raise FatalError("Salesforce returned a non-https instance_url")
        issued = body.get("issued_at")
        issued_at = (
            datetime.fromtimestamp(int(issued) / 1000, UTC)
            if isinstance(issued, str) and issued.isdigit()
            else None
        )
        self.sign_ins += 1
        log.info("salesforce signed in", flow=self._crm.auth.flow, instance=urlsplit(instance).hostname)
        return SalesforceToken(access, instance.rstrip("/"), issued_at)


def _json_or_empty(response: httpx.Response) -> dict[str, object]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
