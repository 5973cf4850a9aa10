"""Differential privacy: noised projections (eq. 16), privacy accounting and budgets,
optional DP-SGD on clients and central DP on aggregated updates (eq. 15)."""
