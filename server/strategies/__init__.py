"""Strategies: how a round's uploads become the next global model (FedAvg, server optimizers, robust rules)."""
