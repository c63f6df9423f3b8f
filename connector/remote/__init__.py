"""Plumbing shared by every remote seam: TLS trust, HTTP clients, retry policy, call counting, twins."""
