"""okx.raw batching: frames exactly as received, one record per connection and batch."""

from __future__ import annotations

from collections.abc import Iterable

from ingest.core.events import InboundFrame
from ingest.core.records import (
    RawFrameEntry,
    RawFrames,
)

#: Most Avro bytes a RawFrameEntry adds besides its payload (two longs and a length, 10 + 10 + 5, rounded up).
RAW_ENTRY_OVERHEAD = 32


def raw_frames(frames: Iterable[InboundFrame], max_bytes: int) -> list[RawFrames]:
    """The okx.raw records of `frames`, each frame's bytes exactly as received.

    One record per connection (in order of first appearance), its frames in receive order, split where OKX's
    connId changes or where the frames would pass `max_bytes` (payload plus RAW_ENTRY_OVERHEAD each; a
    bigger frame gets a record alone). Per connection, the records hold its frames in order, each once.
    """
    runs: dict[str, list[list[InboundFrame]]] = {}
    sizes: dict[str, int] = {}
    for frame in frames:
        conn = frame.conn
        chunks = runs.get(conn)
        size = len(frame.data) + RAW_ENTRY_OVERHEAD
        if chunks is None:
            runs[conn] = [[frame]]
        else:
            last = chunks[-1]
            if last[-1].okx_conn_id == frame.okx_conn_id and sizes[conn] + size <= max_bytes:
                last.append(frame)
                sizes[conn] += size
                continue
            chunks.append([frame])
        sizes[conn] = size
    return [
        RawFrames(conn_id=chunk[0].conn, name=chunk[0].name, endpoint=str(chunk[0].endpoint),
                  okx_conn_id=chunk[0].okx_conn_id,
                  frames=tuple([RawFrameEntry(recv_seq=f.recv_seq, recv_ts_ns=f.recv_ts_ns, payload=f.data)
                                for f in chunk]))
        for chunks in runs.values() for chunk in chunks
    ]

