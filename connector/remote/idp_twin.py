"""A local identity provider that real msal can talk to: the sign-in half of the sandbox.

What msal needs from it (crm-apis.md §C, partner-center-api.md §9):

- ``GET {authority}/v2.0/.well-known/openid-configuration`` with ``authorization_endpoint`` and
  ``token_endpoint`` (the msal constructor fetches it; the authority needs a path segment and
  ``instance_discovery=False``);
- ``POST …/oauth2/v2.0/devicecode`` and the token endpoint for the device-code, password (ROPC),
  refresh-token and client-credentials grants, answering like Entra ID: ``expires_in`` above 300
  (msal treats tokens with less than 5 minutes left as expired), ``client_info`` and an ``id_token``
  so msal can build an account, OAuth errors as 400 + ``error``;
- ``GET /common/userrealm/{user}`` — msal's ROPC path asks it first (§9 quirk).

Tokens are opaque random strings; other twins (Partner Center, Dataverse) call :meth:`IdpTwin.validate`.
Their lifetime runs on the shared :class:`~connector.remote.twin.Clock`, so a test expires a token by
moving the clock, never by sleeping. Devices are approved or denied from tests; refresh tokens can be
revoked.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import jwt

from connector.remote.twin import Clock, Twin, TwinCA, TwinRequest, TwinResponse

if TYPE_CHECKING:
    from connector.settings import Settings

__all__ = ["DEVICE_GRANT", "IdpTwin", "IssuedToken", "TwinClient", "TwinUser"]

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_OIDC_SCOPES = frozenset({"openid", "profile", "offline_access"})


@dataclass
class TwinUser:
    username: str
    password: str
    mfa_required: bool = False

    @property
    def object_id(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"user:{self.username.lower()}"))


@dataclass
class TwinClient:
    client_id: str
    secret: str | None = None
    #: PEM public key (or certificate) that client assertions must be signed for (certificate credential)
    public_key_pem: bytes | None = None


@dataclass(frozen=True)
class IssuedToken:
    """What an access token stands for; ``subject`` is a username or, app-only, the client id."""

    subject: str
    client_id: str
    scopes: tuple[str, ...]
    issued_at: datetime
    expires_at: datetime
    app_only: bool = False


@dataclass
class _DeviceFlow:
    device_code: str
    user_code: str
    client_id: str
    scopes: tuple[str, ...]
    expires_at: datetime
    state: str = "pending"  # pending | approved | denied
    username: str | None = None
    polls: int = 0


@dataclass
class _RefreshToken:
    username: str
    client_id: str
    scopes: tuple[str, ...]
    revoked: bool = False
    uses: int = 0


@dataclass
class _Counters:
    token_requests: dict[str, int] = field(default_factory=dict)


class IdpTwin(Twin):
    """An Entra-ID-like identity provider for one tenant (``/{tenant}`` is the authority path)."""

    name = "idp"

    def __init__(
        self,
        ca: TwinCA,
        *,
        clock: Clock | None = None,
        tenant: str = "tenant1",
        token_lifetime: timedelta = timedelta(hours=1),
        device_interval: int = 5,
        port: int = 0,
    ) -> None:
        super().__init__(ca, clock=clock, port=port)
        if token_lifetime <= timedelta(minutes=5):
            raise ValueError("msal treats tokens with < 5 minutes left as expired: use a longer lifetime")
        self.tenant = tenant
        self.tenant_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"tenant:{tenant}"))
        self.token_lifetime = token_lifetime
        self.device_interval = device_interval
        self.users: dict[str, TwinUser] = {}
        self.clients: dict[str, TwinClient] = {}
        self._access: dict[str, IssuedToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._devices: dict[str, _DeviceFlow] = {}
        self._state = threading.RLock()
        self.counters = _Counters()
        #: approve every device code for this user at its first poll (CLI tests, demos)
        self.auto_approve: str | None = None

    # --- test controls ----------------------------------------------------------------------------
    @property
    def authority(self) -> str:
        return f"{self.base_url}/{self.tenant}"

    def add_user(self, username: str, password: str, *, mfa_required: bool = False) -> TwinUser:
        user = TwinUser(username, password, mfa_required)
        with self._state:
            self.users[username.lower()] = user
        return user

    def add_client(
        self, client_id: str, *, secret: str | None = None, public_key_pem: bytes | None = None
    ) -> TwinClient:
        client = TwinClient(client_id, secret, public_key_pem)
        with self._state:
            self.clients[client_id] = client
        return client

    def pending_device_codes(self) -> list[str]:
        """User codes of device flows waiting for the user (what the operator would type)."""
        with self._state:
            return [f.user_code for f in self._devices.values() if f.state == "pending"]

    def approve_device(self, user_code: str, username: str) -> None:
        self._device_state(user_code, "approved", username)

    def approve_pending(self, username: str) -> None:
        """Approve every waiting device flow as ``username`` (the operator in the browser)."""
        for code in self.pending_device_codes():
            self.approve_device(code, username)

    def sign_in(self, settings: Settings, connection: str, username: str) -> None:
        """A connection's one-off device-code sign-in (`cosell auth login`), approved here as the
        operator would approve it; the msal cache it persists is what later runs use."""
        from connector.remote.signin import partner_center_signin  # msal only when signing in

        signin = partner_center_signin(settings, connection)
        try:
            signin.login_device_code(
                lambda _message: None, sleep=lambda _seconds: self.approve_pending(username)
            )
        finally:
            signin.close()

    def deny_device(self, user_code: str) -> None:
        self._device_state(user_code, "denied", None)

    def _device_state(self, user_code: str, state: str, username: str | None) -> None:
        with self._state:
            for flow in self._devices.values():
                if flow.user_code == user_code:
                    flow.state, flow.username = state, username
                    return
        raise KeyError(f"no device flow with user code {user_code}")

    def revoke_refresh_tokens(self, username: str) -> int:
        """Revoke every refresh token of ``username`` (password reset, admin revocation)."""
        with self._state:
            hits = [rt for rt in self._refresh.values() if rt.username.lower() == username.lower()]
            for rt in hits:
                rt.revoked = True
            return len(hits)

    def refresh_token_uses(self, username: str) -> int:
        with self._state:
            return sum(rt.uses for rt in self._refresh.values() if rt.username.lower() == username.lower())

    # --- for other twins --------------------------------------------------------------------------
    def validate(self, authorization: str | None, *, scope_prefix: str = "") -> IssuedToken | None:
        """The token behind an ``Authorization: Bearer …`` header, if it is known, unexpired on the
        twin clock and (when given) for a scope starting with ``scope_prefix``."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        with self._state:
            issued = self._access.get(authorization.removeprefix("Bearer ").strip())
        if issued is None or self.clock.now() >= issued.expires_at:
            return None
        if scope_prefix and not any(s.startswith(scope_prefix) for s in issued.scopes):
            return None
        return issued

    # --- HTTP -------------------------------------------------------------------------------------
    def handle(self, request: TwinRequest) -> TwinResponse:
        base = f"/{self.tenant}"
        if request.method == "GET" and request.path == f"{base}/v2.0/.well-known/openid-configuration":
            return TwinResponse(200, self._openid_configuration())
        if request.method == "GET" and request.path.startswith("/common/userrealm/"):
            return TwinResponse(
                200,
                {
                    "ver": "1.0",
                    "account_type": "Managed",
                    "domain_name": request.path.rsplit("@", 1)[-1],
                    "cloud_instance_name": "microsoftonline.com",
                    "cloud_audience_urn": "urn:federation:MicrosoftOnline",
                },
            )
        if request.method == "POST" and request.path == f"{base}/oauth2/v2.0/devicecode":
            return self._devicecode(request.form())
        if request.method == "POST" and request.path == f"{base}/oauth2/v2.0/token":
            form = request.form()
            grant = form.get("grant_type", "")
            with self._state:
                self.counters.token_requests[grant] = self.counters.token_requests.get(grant, 0) + 1
            return self._token(grant, form)
        return TwinResponse(404, {"error": "not_found"})

    def _openid_configuration(self) -> dict[str, Any]:
        root = f"{self.base_url}/{self.tenant}"
        return {
            "issuer": f"{root}/v2.0",
            "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
            "token_endpoint": f"{root}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token", "password", DEVICE_GRANT],
        }

    @staticmethod
    def _error(error: str, description: str, status: int = 400) -> TwinResponse:
        return TwinResponse(status, {"error": error, "error_description": description, "error_codes": []})

    def _devicecode(self, form: dict[str, str]) -> TwinResponse:
        client_id = form.get("client_id", "")
        if client_id not in self.clients:
            return self._error("unauthorized_client", f"AADSTS700016: application {client_id} not found")
        flow = _DeviceFlow(
            device_code=secrets.token_urlsafe(24),
            user_code=secrets.token_hex(4).upper(),
            client_id=client_id,
            scopes=_scopes(form),
            expires_at=self.clock.now() + timedelta(minutes=15),
        )
        with self._state:
            self._devices[flow.device_code] = flow
        return TwinResponse(
            200,
            {
                "device_code": flow.device_code,
                "user_code": flow.user_code,
                "verification_uri": f"{self.base_url}/devicelogin",
                "expires_in": 900,
                "interval": self.device_interval,
                "message": f"To sign in, open {self.base_url}/devicelogin and enter the code {flow.user_code}.",
            },
        )

    def _token(self, grant: str, form: dict[str, str]) -> TwinResponse:
        client_id = form.get("client_id", "")
        client = self.clients.get(client_id)
        if client is None:
            return self._error("unauthorized_client", f"AADSTS700016: application {client_id} not found")
        if grant == "client_credentials":
            if not self._client_authenticated(client, form):
                return self._error("invalid_client", "AADSTS7000215: invalid client secret or assertion", 401)
            return TwinResponse(200, self._app_tokens(client_id, _scopes(form)))
        if (
            (client.secret or client.public_key_pem)
            and ("client_secret" in form or "client_assertion" in form)
            and not self._client_authenticated(client, form)
        ):
            return self._error("invalid_client", "AADSTS7000215: invalid client secret or assertion", 401)
        if grant == DEVICE_GRANT:
            return self._device_token(form)
        if grant == "password":
            user = self.users.get(form.get("username", "").lower())
            if user is None or not secrets.compare_digest(user.password, form.get("password", "")):
                return self._error("invalid_grant", "AADSTS50126: invalid username or password")
            if user.mfa_required:
                return self._error(
                    "invalid_grant",
                    "AADSTS50076: you must use multi-factor authentication to access this resource",
                )
            return TwinResponse(200, self._user_tokens(user.username, client_id, _scopes(form)))
        if grant == "refresh_token":
            with self._state:
                rt = self._refresh.get(form.get("refresh_token", ""))
                if rt is not None and not rt.revoked:
                    rt.uses += 1
            if rt is None or rt.revoked or rt.client_id != client_id:
                return self._error(
                    "invalid_grant", "AADSTS50173: the provided grant has expired due to it being revoked"
                )
            return TwinResponse(200, self._user_tokens(rt.username, client_id, _scopes(form) or rt.scopes))
        return self._error("unsupported_grant_type", f"grant {grant!r} is not supported")

    def _device_token(self, form: dict[str, str]) -> TwinResponse:
        with self._state:
            flow = self._devices.get(form.get("device_code", ""))
            if flow is not None:
                flow.polls += 1
        if flow is None or self.clock.now() >= flow.expires_at:
            return self._error("expired_token", "AADSTS70020: the device code expired")
        if flow.state == "pending" and self.auto_approve:
            flow.state, flow.username = "approved", self.auto_approve
        if flow.state == "pending":
            return self._error("authorization_pending", "AADSTS70016: waiting for the user to sign in")
        if flow.state == "denied":
            return self._error("authorization_declined", "AADSTS70000: the user declined")
        with self._state:
            del self._devices[flow.device_code]  # a device code is redeemed once
        assert flow.username is not None
        return TwinResponse(200, self._user_tokens(flow.username, flow.client_id, flow.scopes))

    def _client_authenticated(self, client: TwinClient, form: dict[str, str]) -> bool:
        if client.secret is not None and "client_secret" in form:
            return secrets.compare_digest(client.secret, form["client_secret"])
        if client.public_key_pem is not None and form.get("client_assertion_type") == _ASSERTION_TYPE:
            try:
                claims = jwt.decode(
                    form.get("client_assertion", ""),
                    client.public_key_pem,
                    algorithms=["RS256", "PS256"],
                    audience=f"{self.base_url}/{self.tenant}/oauth2/v2.0/token",
                    options={"verify_exp": False},  # the twin clock, not wall time, decides below
                )
            except jwt.PyJWTError:
                return False
            return bool(claims.get("iss") == client.client_id == claims.get("sub"))
        return False

    def _issue_access(self, subject: str, client_id: str, scopes: tuple[str, ...], *, app_only: bool) -> str:
        now = self.clock.now()
        token = "idp-at-" + secrets.token_urlsafe(24)
        with self._state:
            self._access[token] = IssuedToken(
                subject, client_id, scopes, now, now + self.token_lifetime, app_only=app_only
            )
        return token

    def _app_tokens(self, client_id: str, scopes: tuple[str, ...]) -> dict[str, Any]:
        seconds = int(self.token_lifetime.total_seconds())
        return {
            "token_type": "Bearer",
            "expires_in": seconds,
            "ext_expires_in": seconds,
            "access_token": self._issue_access(client_id, client_id, scopes, app_only=True),
        }

    def _user_tokens(self, username: str, client_id: str, scopes: tuple[str, ...]) -> dict[str, Any]:
        user = self.users.get(username.lower()) or TwinUser(username, "")
        refresh = "idp-rt-" + secrets.token_urlsafe(24)
        with self._state:
            self._refresh[refresh] = _RefreshToken(user.username, client_id, scopes)
        now = self.clock.now()
        seconds = int(self.token_lifetime.total_seconds())
        claims = {
            "iss": f"{self.base_url}/{self.tenant}/v2.0",
            "aud": client_id,
            "sub": user.object_id,
            "oid": user.object_id,
            "tid": self.tenant_id,
            "preferred_username": user.username,
            "name": user.username.split("@")[0],
            "iat": int(now.timestamp()),
            "exp": int((now + self.token_lifetime).timestamp()),
        }
        client_info = {"uid": user.object_id, "utid": self.tenant_id}
        return {
            "token_type": "Bearer",
            "scope": " ".join(scopes),
            "expires_in": seconds,
            "ext_expires_in": seconds,
            "access_token": self._issue_access(user.username, client_id, scopes, app_only=False),
            "refresh_token": refresh,
            "id_token": _unsigned_jwt(claims),
            "client_info": _b64(json.dumps(client_info).encode()),
        }


def _scopes(form: dict[str, str]) -> tuple[str, ...]:
    # Like Entra ID, answer with the resource scopes only (msal adds the OIDC ones to every request).
    return tuple(s for s in form.get("scope", "").split() if s not in _OIDC_SCOPES)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unsigned_jwt(claims: dict[str, Any]) -> str:
    # msal reads id_token claims without verifying them; a signature would prove nothing here.
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."
