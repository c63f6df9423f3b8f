"""Builds, from settings, everything one run of one connection needs: the state store, the mapping,
the Partner Center client and the CRM adapter, all on one call counter and one CA bundle."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from connector.domain.model import Solution, SolutionKind
from connector.mappings import MappingSet, load_mapping_files
from connector.remote.calls import CallCounter
from connector.remote.retry import RetryPolicy
from connector.seams import CrmAdapter, ReferralStore
from connector.settings import DynamicsCrm, Settings
from connector.state import StateStore, open_store
from connector.sync.engine import SyncEngine

__all__ = ["RunContext", "connection_mappings", "run_context"]


@dataclass
class RunContext:
    engine: SyncEngine
    calls: CallCounter
    mappings: MappingSet


def connection_mappings(settings: Settings, name: str) -> MappingSet:
    conn = settings.connection(name)
    base = settings.config_file.parent if settings.config_file else None
    return load_mapping_files(conn.mappings, base)


def _solution_map(mappings: MappingSet) -> dict[str, Solution]:
    return {crm: Solution(SolutionKind.OWN, pc) for crm, pc in mappings.values["solutions"].pairs}


@contextmanager
def run_context(
    settings: Settings,
    name: str,
    store: StateStore | None = None,
    *,
    policy: RetryPolicy | None = None,
    holder: str | None = None,
) -> Iterator[RunContext]:
    """A ready engine for one run of connection ``name``; closes every client afterwards."""
    conn = settings.connection(name)
    mappings = connection_mappings(settings, name)
    calls = CallCounter()
    correlation_id = str(uuid.uuid4())
    with ExitStack() as stack:
        if store is None:
            own = open_store(settings.state_url)
            stack.callback(own.close)
            store = own
        from connector.partner_center.client import PartnerCenterClient

        pc = PartnerCenterClient.from_settings(
            settings, name, calls=calls, policy=policy, correlation_id=correlation_id
        )
        stack.callback(pc.close)
        crm: CrmAdapter
        if isinstance(conn.crm, DynamicsCrm):
            from connector.dynamics.adapter import build_adapter, dataverse_signin

            tokens = dataverse_signin(conn.crm, settings.tls.ca_bundle)
            stack.callback(tokens.close)
            dyn = build_adapter(
                conn.crm,
                tokens=tokens,
                ca_bundle=settings.tls.ca_bundle,
                calls=calls,
                policy=policy,
                stage_mapping=mappings.stages,
            )
            stack.callback(dyn.close)
            crm = dyn
        else:
            from connector.salesforce.adapter import SalesforceAdapter

            sf = SalesforceAdapter(
                conn.crm,
                ca_bundle=settings.tls.ca_bundle,
                calls=calls,
                policy=policy,
                stage_mapping=mappings.stages,
                solution_map=_solution_map(mappings),
            )
            stack.callback(sf.close)
            crm = sf
        referrals: ReferralStore = pc
        engine = SyncEngine(
            name, conn, store, crm, referrals, mappings, holder=holder, correlation_id=correlation_id
        )
        yield RunContext(engine, calls, mappings)
