"""``DynamicsAdapter.opportunity_fields``: the opportunity table's columns and option sets from
Dataverse attribute metadata, read from the Dataverse twin over real HTTPS; and the twin's metadata
endpoints kept to the documented shape (query-metadata-web-api)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from connector.dynamics.adapter import DynamicsAdapter
from connector.dynamics.twin import API_PATH, DataverseTwin, OptionSets
from connector.remote.idp_twin import IdpTwin
from connector.remote.twin import Clock, TwinCA
from tests.dynamics.conftest import AdapterFactory, start_dataverse

pytestmark = pytest.mark.integration

ATTRIBUTES = f"{API_PATH}/EntityDefinitions(LogicalName='opportunity')/Attributes"


def test_opportunity_fields_come_from_attribute_metadata(
    dataverse: DataverseTwin, adapter: DynamicsAdapter
) -> None:
    fields = adapter.opportunity_fields()
    assert fields["new_syncstatus"].type == "String" and not fields["new_syncstatus"].restricted
    assert fields["new_syncwithpartnercenter"].type == "Boolean"
    assert fields["new_lastsyncedon"].type == "DateTime"
    assert fields["ownerid"].type == "Owner"  # a lookup is its attribute, not the _ownerid_value property
    assert "_ownerid_value" not in fields
    stage = fields["salesstage"]
    assert (stage.type, stage.restricted) == ("Picklist", True)
    assert stage.picklist_values == ("Qualify", "Develop", "Propose", "Close")
    assert fields["statuscode"].type == "Status" and fields["statuscode"].restricted
    assert fields["statuscode"].picklist_values == ("In Progress", "On Hold", "Won", "Canceled", "Out-Sold")
    assert fields["statecode"].picklist_values == ("Open", "Won", "Lost")
    # one read of the attribute list, one per option-set type; metadata is not paged
    metadata = dataverse.calls("GET", f"{API_PATH}/EntityDefinitions")
    assert len(metadata) == 5


def test_custom_choice_columns_local_and_global_are_restricted_with_their_labels(
    ca: TwinCA, clock: Clock, idp: IdpTwin, make_adapter: AdapterFactory
) -> None:
    options = OptionSets(
        choices={
            "new_lossreason": {100000000: "Price", 100000001: "Lost to Competitor"},
            "new_helptype": {100000000: "Technical architecture", 100000001: "Proof of concept"},
        },
        global_choices=frozenset({"new_helptype"}),
    )
    twin = start_dataverse(ca, clock, idp, options=options)
    try:
        fields = make_adapter(twin).opportunity_fields()
        assert fields["new_lossreason"].picklist_values == ("Price", "Lost to Competitor")
        assert fields["new_lossreason"].restricted and fields["new_lossreason"].type == "Picklist"
        # a global option set comes in GlobalOptionSet (OptionSet is null): same labels, same rule
        assert fields["new_helptype"].picklist_values == ("Technical architecture", "Proof of concept")
        assert fields["new_helptype"].restricted
    finally:
        twin.stop()


def _get(twin: DataverseTwin, ca: TwinCA, adapter: DynamicsAdapter, path: str) -> httpx.Response:
    token = adapter.session.tokens.token()  # type: ignore[union-attr]
    with httpx.Client(verify=ca.client_context()) as http:
        return http.get(
            f"{twin.base_url}{path}",
            headers={"Authorization": f"Bearer {token}", "OData-MaxVersion": "4.0", "OData-Version": "4.0"},
        )


def test_the_twin_serves_attribute_metadata_in_the_documented_shape(
    ca: TwinCA, clock: Clock, idp: IdpTwin, make_adapter: AdapterFactory
) -> None:
    options = OptionSets(choices={"new_region": {1: "EMEA"}}, global_choices=frozenset({"new_region"}))
    twin = start_dataverse(ca, clock, idp, options=options)
    try:
        adapter = make_adapter(twin)
        listing = _get(twin, ca, adapter, f"{ATTRIBUTES}?$select=LogicalName,AttributeType")
        assert listing.status_code == 200
        body = listing.json()
        assert body["@odata.context"].endswith(
            "#EntityDefinitions('opportunity')/Attributes(LogicalName,AttributeType)"
        )
        by_name: dict[str, Any] = {a["LogicalName"]: a for a in body["value"]}
        assert "@odata.nextLink" not in body  # "There is no paging"
        name = by_name["name"]
        assert name["@odata.type"] == "#Microsoft.Dynamics.CRM.StringAttributeMetadata"
        assert set(name) == {"@odata.type", "LogicalName", "AttributeType", "MetadataId"}  # MetadataId always
        assert by_name["new_region"]["AttributeType"] == "Picklist"

        cast = _get(
            twin,
            ca,
            adapter,
            f"{ATTRIBUTES}/Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName"
            "&$expand=OptionSet($select=Options),GlobalOptionSet($select=Options)",
        ).json()
        picklists = {a["LogicalName"]: a for a in cast["value"]}
        assert set(picklists) == {"salesstage", "new_region"}
        assert picklists["salesstage"]["GlobalOptionSet"] is None
        option = picklists["salesstage"]["OptionSet"]["Options"][0]
        assert option["Value"] == 0 and option["Label"]["UserLocalizedLabel"]["Label"] == "Qualify"
        assert picklists["new_region"]["OptionSet"] is None
        assert picklists["new_region"]["GlobalOptionSet"]["Options"][0]["Label"]["UserLocalizedLabel"] == {
            "Label": "EMEA",
            "LanguageCode": 1033,
            "IsManaged": True,
        }

        refused = {
            # OptionSet is not a property of AttributeMetadata: only a cast reaches it
            f"{ATTRIBUTES}?$select=LogicalName&$expand=OptionSet": "Could not find a property named 'OptionSet'",
            # EnumAttributeMetadata declares the option sets but cannot be cast to
            f"{ATTRIBUTES}/Microsoft.Dynamics.CRM.EnumAttributeMetadata": "cannot be used for a cast",
            f"{ATTRIBUTES}?$select=Nope": "Could not find a property named 'Nope'",
            f"{ATTRIBUTES}?$filter=LogicalName eq 'name'": "$filter",
            f"{API_PATH}/EntityDefinitions(LogicalName='nope')/Attributes": "Could not find an entity",
        }
        for path, message in refused.items():
            response = _get(twin, ca, adapter, path)
            assert response.status_code in (400, 404), path
            assert message in response.json()["error"]["message"], path
    finally:
        twin.stop()
