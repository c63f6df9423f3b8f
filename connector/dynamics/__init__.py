"""Dynamics 365 (Dataverse Web API) seam: OData helpers, the CRM adapter and its local HTTPS twin."""
