"""Tensor <-> bytes (safetensors) and payload chunking: what crosses the wire between peers.

Everything here treats its input as untrusted peer data: bad input raises a ``WireError``
subclass with a message that says which chunk/tensor was wrong, what was expected and what came.
"""
