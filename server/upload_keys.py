"""The run's X25519 upload key (announced in HeartbeatResponse.upload_public_key), kept in
the state directory (0600) so a restarted server still decrypts uploads for its run."""

from __future__ import annotations

from pathlib import Path

from crossfed.common.crypto.secure_files import check_secret_permissions, write_secret_file
from crossfed.common.crypto.upload_encryption import UploadKeyPair
from crossfed.server.errors import StateStoreError

UPLOAD_KEY_NAME = "upload_key.x25519"


def load_or_create_upload_key(state_dir: Path) -> UploadKeyPair:
    """Read the run's private upload key, creating it on first start."""
    path = Path(state_dir) / UPLOAD_KEY_NAME
    if path.exists():
        check_secret_permissions(path)
        try:
            return UploadKeyPair.from_private_bytes(path.read_bytes())
        except Exception as exc:
            raise StateStoreError(f"upload key {path} is unreadable: {exc}") from exc
    pair = UploadKeyPair.generate()
    write_secret_file(path, pair.private_bytes())
    return pair
