"""Helpers shared by the test suites (data generators, servers, scripted clients)."""
