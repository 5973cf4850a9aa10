"""Client daemon: connect, register, train locally on cached embeddings, upload."""
