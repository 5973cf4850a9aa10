"""Federated quality benchmark: ours vs zero-fill / dropout FedAvg, ablations, ceilings."""
