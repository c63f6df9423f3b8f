"""Log redaction: secrets, tokens and customer contact details never reach a log line."""

from __future__ import annotations

import json

import pytest
import structlog

from connector.logs import REDACTED, configure_logging


def test_redacts_secret_keys_contacts_and_tokens_in_text(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")
    log = structlog.get_logger("t")
    log.info(
        "called",
        access_token="eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig",
        client_secret="hunter2",
        detail="Authorization: Bearer abc.def.ghi sent for grace@customer.example",
        contact={"email": "grace@customer.example", "phone": "+1 555 0199"},
        referral_id="r-1",
    )
    line = capsys.readouterr().err.strip()
    event = json.loads(line)
    assert event["referral_id"] == "r-1"
    for leaked in ("hunter2", "eyJhbGci", "abc.def.ghi", "grace@customer.example", "555 0199"):
        assert leaked not in line
    assert event["access_token"] == REDACTED and event["contact"] == REDACTED
    structlog.reset_defaults()
