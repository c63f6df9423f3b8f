"""Salesforce: sign-in, SOQL building, the CRM adapter and a local HTTPS twin of the REST API."""

from __future__ import annotations

from connector.salesforce.adapter import SalesforceAdapter
from connector.salesforce.auth import SalesforceSignIn

__all__ = ["SalesforceAdapter", "SalesforceSignIn"]
