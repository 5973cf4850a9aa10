"""What server and clients both need: model, wire format, crypto, privacy, config, data."""
