"""Helpers of the deployment tests (compose files, the local runner, Docker engine)."""
