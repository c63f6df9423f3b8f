"""The real client, real msal, real HTTPS, against the Partner Center and identity-provider twins."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from connector.domain.model import (
    Address,
    Customer,
    HelpType,
    Money,
    StandardStage,
    Status,
    Substatus,
)
from connector.errors import (
    ConfigError,
    ConflictError,
    RecordError,
    RetryLater,
    RuleViolation,
    SignInRequired,
)
from connector.partner_center.client import PartnerCenterClient
from connector.partner_center.models import format_utc
from connector.partner_center.twin import API_PREFIX, PartnerCenterTwin
from connector.remote.calls import CallCounter
from connector.remote.http import TlsTrustError, http_client
from connector.remote.idp_twin import IdpTwin
from connector.remote.retry import RetryPolicy
from connector.remote.session import ApiSession
from connector.remote.signin import IdentityProviderUnreachable, token_cache_path
from connector.remote.tokens import StaticToken
from connector.remote.twin import Clock, Fault, TwinCA, TwinResponse
from connector.settings import Settings

from .conftest import CONNECTION, fixture_json, new_deal

pytestmark = pytest.mark.integration


def referrals_with(pc: PartnerCenterTwin, crm_id: str) -> list[str]:
    return [rid for rid, doc in pc.referrals.items() if doc.get("externalReferenceId") == crm_id]


def active_ids(pc: PartnerCenterTwin) -> list[str]:
    return [rid for rid, doc in pc.referrals.items() if doc["substatus"] == "Accepted"]


# --- listing -----------------------------------------------------------------------------------


def test_pages_through_5000_referrals_one_call_per_page(
    client: PartnerCenterClient, pc: PartnerCenterTwin, calls: CallCounter
) -> None:
    seeded = pc.seed(5000)
    seen: set[str] = set()
    pages = 0
    for page in client.changes(None):
        pages += 1
        deals, failures = page.converted()
        assert len(deals) <= 100 and not failures
        seen.update(d.referral_id or "" for d in deals)
    assert seen == set(seeded)
    assert pages == 50
    assert calls.total("partner-center") == 50
    assert len(pc.calls("GET", API_PREFIX)) == 50


def test_published_next_links_are_rewritten_onto_the_base_url(
    ca: TwinCA,
    idp: IdpTwin,
    write_config: Callable[..., Settings],
    ca_pem: Path,
    sign_in: Callable[[Settings], None],
) -> None:
    # The published sample's nextLink is http:// and lacks /engagements/ (list-referrals-response.json).
    with PartnerCenterTwin(ca, idp=idp, next_link_style="published") as pc:
        settings = write_config(authority=idp.authority, base_url=pc.api_base_url, ca_bundle=ca_pem)
        sign_in(settings)
        seeded = pc.seed(250)
        with PartnerCenterClient.from_settings(settings, CONNECTION) as client:
            got = [d.referral_id for page in client.changes(None) for d in page.converted()[0]]
        requests = pc.calls("GET", "/")
    assert sorted(got) == sorted(seeded)
    assert len(requests) == 3 and all(r.path == API_PREFIX for r in requests)
    assert [r.arg("$orderby") for r in requests] == ["updatedDateTime asc"] * 3
    assert requests[0].arg("$skiptoken") is None and requests[2].arg("$skiptoken")


def test_a_rename_is_sent_only_where_the_connection_enables_name_patches(
    ca: TwinCA,
    idp: IdpTwin,
    pc: PartnerCenterTwin,
    write_config: Callable[..., Settings],
    ca_pem: Path,
    sign_in: Callable[[Settings], None],
) -> None:
    rid = pc.seed(1)[0]
    for enabled in (False, True):
        settings = write_config(
            authority=idp.authority, base_url=pc.api_base_url, ca_bundle=ca_pem, patch_name=enabled
        )
        sign_in(settings)
        with PartnerCenterClient.from_settings(settings, CONNECTION) as client:
            assert client.patch_name is enabled
            before = client.get(rid)
            renamed = replace(before, name="Renamed", notes="edited too")
            if not enabled:  # the rename is left out (and logged); the rest of the change goes
                after = client.update(before, renamed, request_id="rename-off")
                assert after.name == before.name and after.notes == "edited too"
            else:  # the twin keeps to the Swagger's PATCH paths: the tenant must confirm /name first
                with pytest.raises(RecordError, match="path /name cannot be patched"):
                    client.update(client.get(rid), renamed, request_id="rename-on")


def test_incremental_listing_uses_the_servers_updated_time(
    client: PartnerCenterClient, pc: PartnerCenterTwin, clock: Clock
) -> None:
    pc.seed(20, step=timedelta(minutes=10))
    cursor = list(client.changes(None))[-1].cursor
    # A complete listing moves the cursor up to the server's clock (its Date header) at the listing's
    # start, never to ours: an idle book then stops re-reading the lookback window behind its last change.
    assert cursor == format_utc(clock.now())
    assert cursor is not None and cursor >= max(doc["updatedDateTime"] for doc in pc.referrals.values())

    clock.advance(timedelta(hours=1))
    edited = active_ids(pc)[:2]
    for rid in edited:
        before = client.get(rid)
        client.update(before, replace(before, notes="edited in the CRM"), request_id=str(uuid.uuid4()))

    pages = list(client.changes(cursor))
    got = {d.referral_id for page in pages for d in page.converted()[0]}
    assert got == set(edited)
    assert pages[-1].cursor == format_utc(clock.now())
    last = pc.calls("GET", API_PREFIX)[-1]
    assert last.arg("$filter") == "updatedDateTime ge 2026-03-02T08:55:00.0000000Z"  # watermark 09:00 - 5 min
    assert client.updated_filter_supported is True


# --- writes ------------------------------------------------------------------------------------


def test_create_returns_an_active_accepted_referral(
    client: PartnerCenterClient, pc: PartnerCenterTwin
) -> None:
    created = client.create(new_deal(), request_id=str(uuid.uuid4()))
    assert (created.status, created.substatus) == (Status.ACTIVE, Substatus.ACCEPTED)
    assert created.external_reference_id == "0061x00000AbCdEAAV"
    assert created.version is not None and created.version.value.startswith('"')
    posted = pc.calls("POST", API_PREFIX)[0]
    body = posted.json()
    assert posted.headers["content-type"] == "application/json"
    assert body["salesStage"] == "20" and body["details"]["dealValue"] == 50000
    assert not {"id", "eTag", "createdDateTime", "links"} & body.keys()


def test_create_then_crash_then_retry_creates_exactly_one(
    client: PartnerCenterClient, pc: PartnerCenterTwin
) -> None:
    deal = new_deal()
    request_id = str(uuid.uuid4())
    first = client.create(deal, request_id=request_id)  # ...and the process dies before recording it
    again = client.create(deal, request_id=request_id, resumed=True)
    assert again.referral_id == first.referral_id
    assert referrals_with(pc, "0061x00000AbCdEAAV") == [first.referral_id]
    assert len(pc.calls("POST", API_PREFIX)) == 1


def test_repeated_request_id_is_not_a_second_referral(
    client: PartnerCenterClient, pc: PartnerCenterTwin
) -> None:
    request_id = str(uuid.uuid4())
    first = client.create(new_deal(), request_id=request_id)
    again = client.create(new_deal(), request_id=request_id)
    assert again.referral_id == first.referral_id
    assert len(referrals_with(pc, "0061x00000AbCdEAAV")) == 1


def test_create_whose_answer_was_lost_is_adopted_not_repeated(
    client: PartnerCenterClient, pc: PartnerCenterTwin, waits: list[float]
) -> None:
    pc.lose_response(lambda r: r.method == "POST")  # the referral is created, the answer is a 504
    created = client.create(new_deal(), request_id=str(uuid.uuid4()))
    assert referrals_with(pc, "0061x00000AbCdEAAV") == [created.referral_id]
    assert len(pc.calls("POST", API_PREFIX)) == 1
    assert len(waits) == 1


def test_eTag_mismatch_surfaces_as_a_conflict(client: PartnerCenterClient, pc: PartnerCenterTwin) -> None:
    rid = client.create(new_deal(), request_id=str(uuid.uuid4())).referral_id or ""
    before = client.get(rid)
    client.update(before, replace(before, notes="theirs"), request_id=str(uuid.uuid4()))
    with pytest.raises(ConflictError) as caught:
        client.update(before, replace(before, notes="ours"), request_id=str(uuid.uuid4()))
    assert caught.value.record_id == rid and caught.value.expected_version == before.version.value  # type: ignore[union-attr]
    assert pc.referrals[rid]["details"]["notes"] == "theirs"


def test_update_sends_if_match_and_gets_the_new_etag(
    client: PartnerCenterClient, pc: PartnerCenterTwin
) -> None:
    rid = client.create(new_deal(), request_id=str(uuid.uuid4())).referral_id or ""
    before = client.get(rid)
    after = client.update(
        before,
        replace(before, sales_stage=StandardStage.PROPOSED, value=Money(Decimal("75000.50"), "USD")),
        request_id=str(uuid.uuid4()),
    )
    patch = pc.calls("PATCH", API_PREFIX)[-1]
    assert patch.headers["if-match"] == before.version.value  # type: ignore[union-attr]
    assert patch.headers["prefer"] == "return=representation"
    assert after.version != before.version and after.sales_stage is StandardStage.PROPOSED
    assert pc.referrals[rid]["details"]["dealValue"] == 75000.5
    assert pc.referrals[rid]["salesStage"] == "60"


# --- transient failures ------------------------------------------------------------------------


def test_429_retry_after_is_honoured(
    client: PartnerCenterClient, pc: PartnerCenterTwin, waits: list[float]
) -> None:
    pc.seed(150)
    throttled = TwinResponse(429, fixture_json("error-throttled-429.json"), {"Retry-After": "57"})
    pc.inject(Fault(throttled, match=lambda r: r.method == "GET"))
    got = [d for page in client.changes(None) for d in page.converted()[0]]
    assert len(got) == 150
    assert waits == [57.0]


def test_5xx_on_patch_is_retried_with_the_same_request_id(
    client: PartnerCenterClient, pc: PartnerCenterTwin, waits: list[float]
) -> None:
    rid = client.create(new_deal(), request_id=str(uuid.uuid4())).referral_id or ""
    before = client.get(rid)
    pc.inject(Fault(TwinResponse(503, "busy"), match=lambda r: r.method == "PATCH"))
    client.update(
        before, replace(before, notes="after a 503"), request_id="0f4c2b7e-5d4e-4c59-9d0b-9f3f2a1f0c11"
    )
    patches = pc.calls("PATCH", API_PREFIX)
    assert [p.headers["ms-requestid"] for p in patches] == ["0f4c2b7e-5d4e-4c59-9d0b-9f3f2a1f0c11"] * 2
    assert len({p.headers["ms-correlationid"] for p in pc.requests}) == 1
    assert len(waits) == 1 and pc.referrals[rid]["details"]["notes"] == "after a 503"


def test_token_expiry_mid_run_is_transparent(
    client: PartnerCenterClient, pc: PartnerCenterTwin, idp: IdpTwin, clock: Clock, calls: CallCounter
) -> None:
    pc.seed(300)
    pages = client.changes(None)
    first = next(pages)
    clock.advance(timedelta(hours=2))  # the access token msal still holds is now expired on the server
    rest = [d for page in pages for d in page.converted()[0]]
    assert len(first.converted()[0]) + len(rest) == 300
    assert idp.counters.token_requests.get("refresh_token") == 1
    snapshot = {k.status: n for k, n in calls.snapshot().items()}
    assert snapshot == {"200": 3, "401": 1}


# --- refused before any request ----------------------------------------------------------------


def test_terminal_referral_is_refused_before_any_request(
    client: PartnerCenterClient, pc: PartnerCenterTwin
) -> None:
    won = pc.put(fixture_json("referral-real-closed-won-ppe.json"))
    before = client.get(won["id"])
    sent = len(pc.requests)
    with pytest.raises(RuleViolation) as caught:
        client.update(before, replace(before, notes="late edit"), request_id=str(uuid.uuid4()))
    assert caught.value.rule == "terminal-immutable"
    assert "can never be changed" in str(caught.value)
    assert len(pc.requests) == sent


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"share_with_microsoft": False}, "share-no-downgrade"),
        ({"customer": Customer("Someone Else", Address(country="AR"))}, "immutable-field"),
        ({"status": Status.NEW, "substatus": Substatus.RECEIVED}, "status-transition"),
    ],
)
def test_rule_violations_are_refused_before_any_request(
    client: PartnerCenterClient, pc: PartnerCenterTwin, change: dict[str, object], rule: str
) -> None:
    accepted = pc.put(fixture_json("referral-real-inbound-active-accepted.json"))
    before = client.get(accepted["id"])
    sent = len(pc.requests)
    with pytest.raises(RuleViolation) as caught:
        client.update(before, replace(before, **change), request_id=str(uuid.uuid4()))  # type: ignore[arg-type]
    assert caught.value.rule == rule
    assert len(pc.requests) == sent


def test_change_without_a_patch_path_is_refused_before_any_request(
    client: PartnerCenterClient, pc: PartnerCenterTwin
) -> None:
    accepted = pc.put(fixture_json("referral-real-inbound-active-accepted.json"))
    before = client.get(accepted["id"])
    sent = len(pc.requests)
    with pytest.raises(RecordError) as caught:
        client.update(before, replace(before, help_requested=HelpType.QUOTES_OR_LICENSING), request_id="x")
    assert caught.value.cause == "pc-not-patchable"
    assert len(pc.requests) == sent


# --- clear errors, nothing written -------------------------------------------------------------


def _nothing_written(settings: Settings) -> bool:
    return not settings.data_dir.exists()


def test_unknown_connection(settings: Settings, pc: PartnerCenterTwin) -> None:
    with pytest.raises(ConfigError) as caught:
        PartnerCenterClient.from_settings(settings, "globex")
    assert "connections.globex" in str(caught.value) and "acme" in str(caught.value)
    assert _nothing_written(settings) and pc.requests == []


def test_sign_in_never_done(
    settings: Settings, pc: PartnerCenterTwin, idp: IdpTwin, policy: RetryPolicy
) -> None:
    with (
        PartnerCenterClient.from_settings(settings, CONNECTION, policy=policy) as client,
        pytest.raises(SignInRequired) as caught,
    ):
        list(client.changes(None))
    assert "cosell auth login --connection acme" in str(caught.value)
    assert pc.requests == [] and idp.requests == []
    assert _nothing_written(settings)


def test_refresh_token_revoked(
    client: PartnerCenterClient, settings: Settings, pc: PartnerCenterTwin, idp: IdpTwin, clock: Clock
) -> None:
    cache = token_cache_path(settings, CONNECTION)
    before = cache.read_bytes()
    idp.revoke_refresh_tokens("pc-service@partner.example")
    clock.advance(timedelta(hours=2))
    with pytest.raises(SignInRequired) as caught:
        list(client.changes(None))
    assert "expired or was revoked" in str(caught.value) and "cosell auth login" in str(caught.value)
    assert cache.read_bytes() == before
    assert len(pc.requests) == 1  # the 401 that started it; nothing after


def test_authority_unreachable(
    settings: Settings,
    sign_in: Callable[[Settings], None],
    pc: PartnerCenterTwin,
    idp: IdpTwin,
    policy: RetryPolicy,
    waits: list[float],
) -> None:
    sign_in(settings)
    cache = token_cache_path(settings, CONNECTION)
    before = cache.read_bytes()
    idp.stop()
    with (
        PartnerCenterClient.from_settings(settings, CONNECTION, policy=policy) as client,
        pytest.raises(IdentityProviderUnreachable) as caught,
    ):
        list(client.changes(None))
    assert isinstance(caught.value, RetryLater)
    assert "cannot reach the identity provider" in str(caught.value) and "partner_center.authority" in str(
        caught.value
    )
    assert len(waits) == policy.max_attempts - 1  # bounded: gave up after the retry budget
    assert cache.read_bytes() == before and pc.requests == []


def test_tls_failure_at_sign_in_hints_at_ca_bundle(
    settings: Settings,
    sign_in: Callable[[Settings], None],
    write_config: Callable[..., Settings],
    pc: PartnerCenterTwin,
    idp: IdpTwin,
) -> None:
    sign_in(settings)
    cache = token_cache_path(settings, CONNECTION)
    before = cache.read_bytes()
    untrusting = write_config(authority=idp.authority, base_url=pc.api_base_url, ca_bundle=None)
    with (
        PartnerCenterClient.from_settings(untrusting, CONNECTION) as client,
        pytest.raises(TlsTrustError) as caught,
    ):
        list(client.changes(None))
    assert "tls.ca_bundle" in str(caught.value)
    assert cache.read_bytes() == before and pc.requests == []


def test_tls_failure_on_the_api_hints_at_ca_bundle(pc: PartnerCenterTwin, waits: list[float]) -> None:
    session = ApiSession(
        "partner-center", http_client(None), tokens=StaticToken("t"), policy=RetryPolicy(sleep=waits.append)
    )
    with (
        PartnerCenterClient(session, base_url=pc.api_base_url) as client,
        pytest.raises(TlsTrustError) as caught,
    ):
        client.get(str(uuid.uuid4()))
    assert "tls.ca_bundle" in str(caught.value)
    assert waits == []  # not retried: an untrusted certificate does not heal
