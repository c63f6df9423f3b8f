"""Billing country text -> ISO 3166-1 alpha-2, for orgs without state/country picklists.

Orgs with state and country picklists expose ``BillingCountryCode`` and the adapter uses it; others
hold free text in ``BillingCountry``. Partner Center needs the two-letter code (cosell-domain.md), so
an unrecognised name is reported on the record rather than guessed.
"""

from __future__ import annotations

from connector.domain.codes import ISO_3166_ALPHA2

__all__ = ["country_code"]

_NAMES: dict[str, str] = {
    "united states": "US",
    "united states of america": "US",
    "usa": "US",
    "u.s.a.": "US",
    "u.s.": "US",
    "america": "US",
    "united kingdom": "GB",
    "uk": "GB",
    "u.k.": "GB",
    "great britain": "GB",
    "england": "GB",
    "scotland": "GB",
    "wales": "GB",
    "germany": "DE",
    "deutschland": "DE",
    "france": "FR",
    "japan": "JP",
    "canada": "CA",
    "australia": "AU",
    "new zealand": "NZ",
    "ireland": "IE",
    "netherlands": "NL",
    "the netherlands": "NL",
    "holland": "NL",
    "belgium": "BE",
    "luxembourg": "LU",
    "switzerland": "CH",
    "austria": "AT",
    "italy": "IT",
    "spain": "ES",
    "portugal": "PT",
    "sweden": "SE",
    "norway": "NO",
    "denmark": "DK",
    "finland": "FI",
    "iceland": "IS",
    "poland": "PL",
    "czech republic": "CZ",
    "czechia": "CZ",
    "hungary": "HU",
    "romania": "RO",
    "greece": "GR",
    "turkey": "TR",
    "türkiye": "TR",
    "israel": "IL",
    "united arab emirates": "AE",
    "uae": "AE",
    "saudi arabia": "SA",
    "south africa": "ZA",
    "nigeria": "NG",
    "kenya": "KE",
    "egypt": "EG",
    "india": "IN",
    "china": "CN",
    "hong kong": "HK",
    "taiwan": "TW",
    "singapore": "SG",
    "malaysia": "MY",
    "indonesia": "ID",
    "thailand": "TH",
    "vietnam": "VN",
    "viet nam": "VN",
    "philippines": "PH",
    "south korea": "KR",
    "korea, republic of": "KR",
    "republic of korea": "KR",
    "brazil": "BR",
    "brasil": "BR",
    "mexico": "MX",
    "méxico": "MX",
    "argentina": "AR",
    "chile": "CL",
    "colombia": "CO",
    "peru": "PE",
}


def country_code(text: str) -> str | None:
    """The ISO-2 code for a country code or a common English name; None when unknown."""
    value = " ".join(text.split())
    if not value:
        return None
    if len(value) == 2 and value.upper() in ISO_3166_ALPHA2:
        return value.upper()
    return _NAMES.get(value.casefold())
