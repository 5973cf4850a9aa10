"""`crossfed demo`: a whole federation on loopback, the README's main command."""
