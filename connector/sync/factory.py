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

__all__ = ["ConnectionClients", "RunContext", "connection_mappings", "run_context"]


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


class ConnectionClients:
    """The remote clients of one connection: the Partner Center client and the CRM adapter, on one
    call counter and one CA bundle.

    A one-off ``cosell sync`` builds them for its run and closes them after. The daemon keeps one set
    per connection across runs, so that an idle run costs one read call per system: the sign-in, the
    CRM's field and stage metadata (re-read after the adapter's ``metadata_ttl``) and the HTTP
    connections stay warm between runs instead of being paid again every few minutes."""

    def __init__(self, settings: Settings, name: str, *, policy: RetryPolicy | None = None) -> None:
        self.name = name
        conn = settings.connection(name)
        self.mappings = connection_mappings(settings, name)
        self.calls = CallCounter()
        with ExitStack() as stack:
            from connector.partner_center.client import PartnerCenterClient

            self.pc = PartnerCenterClient.from_settings(settings, name, calls=self.calls, policy=policy)
            stack.callback(self.pc.close)
            self.crm: CrmAdapter
            if isinstance(conn.crm, DynamicsCrm):
                from connector.dynamics.adapter import build_adapter, dataverse_signin

                tokens = dataverse_signin(conn.crm, settings.tls.ca_bundle)
                stack.callback(tokens.close)
                dyn = build_adapter(
                    conn.crm,
                    tokens=tokens,
                    ca_bundle=settings.tls.ca_bundle,
                    calls=self.calls,
                    policy=policy,
                    stage_mapping=self.mappings.stages,
                )
                stack.callback(dyn.close)
                self.crm = dyn
            else:
                from connector.salesforce.adapter import SalesforceAdapter

                sf = SalesforceAdapter(
                    conn.crm,
                    ca_bundle=settings.tls.ca_bundle,
                    calls=self.calls,
                    policy=policy,
                    stage_mapping=self.mappings.stages,
                    solution_map=_solution_map(self.mappings),
                )
                stack.callback(sf.close)
                self.crm = sf
            self._closing = stack.pop_all()

    def close(self) -> None:
        self._closing.close()


@contextmanager
def run_context(
    settings: Settings,
    name: str,
    store: StateStore | None = None,
    *,
    policy: RetryPolicy | None = None,
    holder: str | None = None,
    clients: ConnectionClients | None = None,
    keep: dict[str, ConnectionClients] | None = None,
) -> Iterator[RunContext]:
    """A ready engine for one run of connection ``name``. Without ``clients`` the run builds its own
    and closes them afterwards; with them, or with a ``keep`` cache (the daemon's, by connection
    name) they stay open for the next run. ``RunContext.calls`` counts this run's calls only."""
    conn = settings.connection(name)
    correlation_id = str(uuid.uuid4())
    with ExitStack() as stack:
        if store is None:
            own = open_store(settings.state_url)
            stack.callback(own.close)
            store = own
        if clients is None and keep is not None:
            clients = keep.get(name)
            if clients is None:
                clients = keep[name] = ConnectionClients(settings, name, policy=policy)
        if clients is None:
            clients = ConnectionClients(settings, name, policy=policy)
            stack.callback(clients.close)
        calls = clients.calls.window()
        # MS-CorrelationId ties one run's Partner Center requests together (partner-center-api.md)
        clients.pc.correlation_id = correlation_id
        referrals: ReferralStore = clients.pc
        engine = SyncEngine(
            name, conn, store, clients.crm, referrals, clients.mappings, holder=holder,
            correlation_id=correlation_id,
        )  # fmt: skip
        yield RunContext(engine, calls, clients.mappings)
