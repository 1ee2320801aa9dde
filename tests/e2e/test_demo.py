"""`okx-ingest demo`: it says where its data is, and `--keep` leaves the broker and data up to look at."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import pytest

from ingest.demo import command_name, run_demo
from ingest.tail import tail
from tests.integration.test_tail import Signalling


async def test_demo_prints_the_tail_command_and_keep_leaves_the_data_readable_until_released() -> None:
    out, release = Signalling(), asyncio.Event()
    demo = asyncio.create_task(run_demo(seconds=3.0, keep=True, out=out, release=release))
    try:
        async with asyncio.timeout(60):
            while "keeps the data until Ctrl-C" not in out.getvalue():
                out.wrote.clear()
                await out.wrote.wait()
        text = out.getvalue()
        match = re.search(r"tail trades --bootstrap (127\.0\.0\.1:\d+) --inst BTC-USDT --follow", text)
        assert match is not None, text
        bootstrap = match.group(1)
        # The recording has stopped; the broker is still up with what it recorded.
        from ingest.config import load_settings

        seen = io.StringIO()
        printed = await tail(load_settings(None), ["trades"], out=seen, bootstrap=bootstrap, inst="BTC-USDT",
                             last=5, timeout_s=20)
        assert printed == 5 and all("BTC-USDT" in line for line in seen.getvalue().splitlines())
        assert not demo.done()
    finally:
        release.set()
        async with asyncio.timeout(30):
            code = await demo
    assert code == 0
    host, port = bootstrap.split(":")
    with pytest.raises(OSError):  # released: the broker is gone
        await asyncio.open_connection(host, int(port))


def test_the_printed_command_is_the_one_that_runs_okx_ingest(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "bin" / "okx-ingest"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert command_name(str(exe)) == str(exe)  # `make demo`: not on PATH, so the path that works
    monkeypatch.setenv("PATH", str(exe.parent))
    assert command_name(str(exe)) == "okx-ingest"
    assert command_name("/usr/bin/python3") == "okx-ingest"  # python -m ingest.cli
