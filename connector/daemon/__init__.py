"""The long-running side of the connector: ``cosell run``.

- :mod:`connector.daemon.scheduler`: APScheduler jobs, one incremental and one full-reconciliation job
  per connection, back-off for a failing connection, graceful stop;
- :mod:`connector.daemon.http`: ``/healthz``, ``/readyz`` and ``/metrics`` on ``settings.http``;
- :mod:`connector.daemon.metrics`: the Prometheus metrics, on a registry of their own.
"""
