"""Generated protobuf/gRPC code for the crossfed.v1 wire contract (see *.proto here)."""
