"""Coordination server: gRPC servicers (thin), round engine, aggregation, state, admin."""
