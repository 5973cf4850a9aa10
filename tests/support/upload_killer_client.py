"""A real `crossfed client start` process that dies abruptly (os._exit) in the middle of its
first upload stream, after the header and one chunk went out: the fault the federation test
injects. Not a test module; run as a script with the usual client flags."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

from crossfed.client.transport import GrpcTransport
from crossfed.v1 import coordinator_pb2

KILL_EXIT_CODE = 17
_original_upload = GrpcTransport.upload


def _dying_upload(
    self: GrpcTransport, messages: Iterable[coordinator_pb2.UploadMessage]
) -> coordinator_pb2.UploadResponse:
    def cut() -> Iterator[coordinator_pb2.UploadMessage]:
        for index, message in enumerate(messages):
            if index == 2:  # header and chunk 0 are on the wire
                time.sleep(0.3)
                sys.stderr.write("upload_killer_client: dying mid-upload\n")
                sys.stderr.flush()
                os._exit(KILL_EXIT_CODE)
            yield message

    return _original_upload(self, cut())


GrpcTransport.upload = _dying_upload  # type: ignore[method-assign]

if __name__ == "__main__":
    from crossfed.cli import main

    sys.argv = ["crossfed", "client", "start", *sys.argv[1:]]
    main()
