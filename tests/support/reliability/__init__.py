"""Helpers of the fault-injection suite (server process, scripted clients, checks)."""
