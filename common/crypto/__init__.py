"""Security primitives: certificates and TLS credentials, client identities and per-RPC
authentication, and encryption of model uploads (design card: Wire and security)."""
