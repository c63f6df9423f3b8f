"""Writes a :class:`~connector.sandbox.book.Book` into the twins, through their direct-data paths (no
HTTP): Salesforce rows, Dataverse rows, Partner Center referrals. Ids come from the book, or from a
random generator seeded by the book's seed, so the same book always gives the same records."""

from __future__ import annotations

import random
import uuid

from connector.dynamics.twin import DataverseTwin
from connector.partner_center.twin import PartnerCenterTwin
from connector.salesforce.soql import id_checksum
from connector.salesforce.twin import SalesforceTwin
from connector.sandbox.book import DV_STAGES, LOST_REASONS, Book, CrmDeal

__all__ = ["seed_dataverse", "seed_partner_center", "seed_salesforce"]


def _sf_id(prefix: str, n: int) -> str:
    id15 = f"{prefix}Sb{n:010d}"
    return id15 + id_checksum(id15)


def seed_salesforce(twin: SalesforceTwin, book: Book) -> None:
    """Users (sellers), accounts with their primary contacts, products, and the opportunities with
    contact roles, team members and line items."""
    users = []
    for i, p in enumerate(book.sellers):
        users.append(
            twin.add_row(
                "User",
                {"Id": _sf_id("005", i + 1), "FirstName": p.first, "LastName": p.last, "Name": p.full,
                 "Email": p.email, "Phone": p.phone, "Title": p.title, "IsActive": True},
            )
        )  # fmt: skip
    accounts, contacts = [], []
    for i, c in enumerate(book.companies):
        accounts.append(
            twin.add_row(
                "Account",
                {"Id": _sf_id("001", i + 1), "Name": c.name, "BillingStreet": c.street,
                 "BillingCity": c.city, "BillingState": c.state or None, "BillingPostalCode": c.postal_code,
                 "BillingCountry": c.country, "DunsNumber": c.duns},
            )
        )  # fmt: skip
        contacts.append(
            twin.add_row(
                "Contact",
                {"Id": _sf_id("003", i + 1), "FirstName": c.contact.first, "LastName": c.contact.last,
                 "Email": c.contact.email, "Phone": c.contact.phone, "Title": c.contact.title,
                 "AccountId": accounts[i]},
            )
        )  # fmt: skip
    products = {}
    for i, s in enumerate(book.solutions):
        products[s.code] = twin.add_row(
            "Product2", {"Id": _sf_id("01t", i + 1), "Name": s.name, "ProductCode": s.code, "IsActive": True}
        )
    names = {s.code: s.name for s in book.solutions}
    multi_currency = "CurrencyIsoCode" in twin.schema["Opportunity"]
    for d in book.salesforce:
        values: dict[str, object] = {
            "Id": d.id,
            "Name": d.name,
            "StageName": d.stage,
            "Probability": float(d.probability),
            "Amount": float(d.amount),
            "CloseDate": d.close_date,
            "AccountId": accounts[d.company],
            "OwnerId": users[d.owner],
            "Description": d.notes,
            "Sync_with_Partner_Center__c": d.opted_in,
            "Partner_Center_Help_Type__c": d.help_type,
        }
        if multi_currency:
            values["CurrencyIsoCode"] = d.currency
        twin.add_row("Opportunity", values)
        twin.add_row(
            "OpportunityContactRole",
            {
                "OpportunityId": d.id,
                "ContactId": contacts[d.company],
                "Role": "Decision Maker",
                "IsPrimary": True,
            },
        )
        for member in d.team:
            twin.add_row(
                "OpportunityTeamMember",
                {"OpportunityId": d.id, "UserId": users[member], "TeamMemberRole": "Sales Rep",
                 "OpportunityAccessLevel": "Edit"},
            )  # fmt: skip
        for code in d.solutions:
            price = float(d.amount) / len(d.solutions)
            twin.add_row(
                "OpportunityLineItem",
                {"OpportunityId": d.id, "Product2Id": products[code], "ProductCode": code, "Name": names[code],
                 "Quantity": 1.0, "UnitPrice": price, "TotalPrice": price},
            )  # fmt: skip


def seed_dataverse(twin: DataverseTwin, book: Book) -> None:
    """Currencies, system users, accounts and contacts, products, and the opportunities with their
    product lines; closed deals carry Dataverse's Won/Lost state and status reason."""
    rng = random.Random(f"dataverse-{book.seed}")  # noqa: S311 - deterministic sample ids, not secrets

    def gid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    currencies = {"USD": twin.base_currency}
    for code, name in (("EUR", "Euro"), ("GBP", "Pound Sterling")):
        currencies[code] = twin.insert(
            "transactioncurrencies", {"isocurrencycode": code, "currencyname": name}, row_id=gid()
        )
    users = [
        twin.insert(
            "systemusers",
            {"firstname": p.first, "lastname": p.last, "fullname": p.full, "internalemailaddress": p.email,
             "address1_telephone1": p.phone, "title": p.title},
            row_id=gid(),
        )
        for p in book.sellers
    ]  # fmt: skip
    accounts, contacts = [], []
    for c in book.companies:
        account = twin.insert(
            "accounts",
            {"name": c.name, "address1_line1": c.street, "address1_city": c.city,
             "address1_stateorprovince": c.state or None, "address1_postalcode": c.postal_code,
             "address1_country": c.country},
            row_id=gid(),
        )  # fmt: skip
        accounts.append(account)
        contacts.append(
            twin.insert(
                "contacts",
                {"firstname": c.contact.first, "lastname": c.contact.last, "fullname": c.contact.full,
                 "emailaddress1": c.contact.email, "telephone1": c.contact.phone, "jobtitle": c.contact.title,
                 "_parentcustomerid_value": account},
                row_id=gid(),
            )
        )  # fmt: skip
    products = {
        s.code: twin.insert("products", {"name": s.name, "productnumber": s.code}, row_id=gid())
        for s in book.solutions
    }
    stage_values = {label: value for value, label, _p in DV_STAGES}
    for i, d in enumerate(book.dynamics):
        values: dict[str, object] = {
            "name": d.name,
            "estimatedvalue": float(d.amount),
            "estimatedclosedate": d.close_date.isoformat(),
            "closeprobability": d.probability,
            "description": d.notes,
            "_parentaccountid_value": accounts[d.company],
            "_customerid_value": accounts[d.company],
            "_parentcontactid_value": contacts[d.company],
            "_transactioncurrencyid_value": currencies[d.currency],
            "_ownerid_value": users[d.owner],
            "new_syncwithpartnercenter": d.opted_in,
        }
        values.update(_dv_stage(d, stage_values, i))
        twin.insert("opportunities", values, row_id=d.id)
        for code in d.solutions:
            twin.insert(
                "opportunityproducts",
                {"_opportunityid_value": d.id, "_productid_value": products[code], "quantity": 1,
                 "priceperunit": float(d.amount) / len(d.solutions)},
                row_id=gid(),
            )  # fmt: skip
        if d.stage in ("Won", "Lost"):
            twin.insert(
                "opportunitycloses",
                {"subject": f"{d.stage}: {d.name}"[:200], "_opportunityid_value": d.id,
                 "actualrevenue": float(d.amount) if d.stage == "Won" else 0.0,
                 "actualend": d.close_date.isoformat(),
                 "description": "" if d.stage == "Won" else LOST_REASONS[i % len(LOST_REASONS)]},
                row_id=gid(),
            )  # fmt: skip


def _dv_stage(d: CrmDeal, stage_values: dict[str, int], i: int) -> dict[str, object]:
    if d.stage == "Won":
        return {"statecode": 1, "statuscode": 3, "salesstage": 3, "actualvalue": float(d.amount),
                "actualclosedate": d.close_date.isoformat()}  # fmt: skip
    if d.stage == "Lost":
        # Dataverse's two lost reasons: Canceled (4) and Out-Sold (5)
        return {"statecode": 2, "statuscode": 4 + i % 2, "salesstage": 2,
                "actualclosedate": d.close_date.isoformat()}  # fmt: skip
    return {"statecode": 0, "statuscode": 1, "salesstage": stage_values[d.stage]}


def seed_partner_center(twin: PartnerCenterTwin, book: Book, connection_crm: str) -> None:
    """The referrals of the partner account paired with ``connection_crm`` (salesforce | dynamics)."""
    for doc in book.referrals[connection_crm]:
        twin.put(doc)
