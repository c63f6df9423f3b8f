"""The single ca_bundle setting wins over REQUESTS_CA_BUNDLE / SSL_CERT_FILE for every client kind.

This machine exports both variables; requests silently prefers them over session.verify unless
trust_env is off (crm-apis.md §D). These tests prove both client factories honour the setting over
real TLS against a twin, and that the trap is real.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests

from connector.remote.http import http_client, requests_session
from connector.remote.twin import Twin, TwinCA, TwinRequest, TwinResponse


class Echo(Twin):
    name = "echo"

    def handle(self, request: TwinRequest) -> TwinResponse:
        return TwinResponse(200, {"path": request.path})


@pytest.fixture(scope="module")
def ca() -> TwinCA:
    return TwinCA()


@pytest.fixture(scope="module")
def twin(ca: TwinCA) -> Iterator[Echo]:
    with Echo(ca) as t:
        yield t  # type: ignore[misc]


@pytest.fixture
def ca_file(ca: TwinCA, tmp_path: Path) -> Path:
    return ca.write_pem(tmp_path / "ca.pem")


@pytest.fixture
def other_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    unrelated = TwinCA().write_pem(tmp_path / "unrelated.pem")
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.setenv(name, str(unrelated))
    return unrelated


def test_httpx_client_trusts_exactly_the_ca_bundle(twin: Echo, ca_file: Path, other_bundle: Path) -> None:
    with http_client(ca_file) as client:
        assert client.get(f"{twin.base_url}/x").json() == {"path": "/x"}
    with http_client(None) as client, pytest.raises(httpx.ConnectError):
        client.get(f"{twin.base_url}/x")


def test_requests_session_trusts_the_ca_bundle_despite_env(
    twin: Echo, ca_file: Path, other_bundle: Path
) -> None:
    session = requests_session(ca_file)
    assert session.get(f"{twin.base_url}/y", timeout=10).json() == {"path": "/y"}


def test_the_trap_is_real_without_trust_env_off(twin: Echo, ca_file: Path, other_bundle: Path) -> None:
    naive = requests.Session()
    naive.verify = str(ca_file)  # silently replaced by REQUESTS_CA_BUNDLE
    with pytest.raises(requests.exceptions.SSLError):
        naive.get(f"{twin.base_url}/z", timeout=10)


def test_twin_logs_requests_and_injects_faults(twin: Echo, ca_file: Path) -> None:
    from connector.remote.twin import Fault

    with http_client(ca_file) as client, twin.faults(Fault(TwinResponse(503, {"e": 1}), times=1)):
        assert client.get(f"{twin.base_url}/f").status_code == 503
        assert client.get(f"{twin.base_url}/f").status_code == 200
    assert len(twin.calls("GET", "/f")) == 2
