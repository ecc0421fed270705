"""The engine's read-ahead thread: it reads exactly the ranges the merge takes, in order,
and hands over errors and stale files as the merge thread's own reads would."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergepipe.engine.reader import BlockReader
from mergepipe.errors import BadCheckpointError, StaleModelError
from mergepipe.hashing import tensor_hasher
from mergepipe.planner.plan import Read, Source


def _file(tmp_path: Path, n: int = 4096) -> tuple[list[Source], bytes]:
    data = bytes(range(256)) * (n // 256)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.bin").write_bytes(data)
    src = Source(key="m", model_id="m", path=str(tmp_path / "m"), fingerprint="", role="expert")
    return [src], data


def _read(nbytes: int) -> Read:
    return Read(src=0, file="x.bin", offset=0, nbytes=nbytes, dtype="U8")


def test_scheduled_ranges_come_back_in_order_and_skipped_ones_are_counted(tmp_path):
    sources, data = _file(tmp_path)
    reader = BlockReader(sources)
    ahead = reader.start_read_ahead(1 << 20)
    r = _read(len(data))
    ahead.schedule([(r, 0, 100, "x", None, False), (r, 100, 100, "x", None, False),
                    (r, 200, 100, "x", None, False)])
    assert bytes(reader.raw(r, 0, 100)) == data[:100]
    # the merge skips the second range: it is dropped, and its bytes count as unused
    assert bytes(reader.raw(r, 200, 100)) == data[200:300]
    # a range never scheduled is read directly
    assert bytes(reader.raw(r, 300, 50)) == data[300:350]
    reader.close()
    assert ahead.unused_bytes in (0, 100)   # 0 if the thread had not reached it yet
    assert reader.bytes_read == [250]       # counted when taken, never for skipped ranges


def test_decoded_rows_equal_the_direct_read(tmp_path):
    x = torch.randn(64, 32).to(torch.bfloat16)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.bin").write_bytes(x.view(torch.uint8).numpy().tobytes())
    src = Source(key="m", model_id="m", path=str(tmp_path / "m"), fingerprint="", role="expert")
    r = Read(src=0, file="x.bin", offset=0, nbytes=x.numel() * 2, dtype="BF16")
    direct = BlockReader([src]).rows(r, (64, 32), 8, 24, "x")
    reader = BlockReader([src])
    reader.start_read_ahead(1 << 20).schedule([(r, 8 * 64, 16 * 64, "x", (16, 32), False)])
    got = reader.rows(r, (64, 32), 8, 24, "x")
    reader.close()
    assert torch.equal(got, direct) and torch.equal(got, x[8:24].float())


def test_an_error_on_the_read_ahead_thread_reaches_the_merge(tmp_path):
    sources, data = _file(tmp_path)
    reader = BlockReader(sources)
    r = _read(len(data) + 100)   # the file is shorter than the tensor claims
    reader.start_read_ahead(1 << 20).schedule([(r, 0, len(data) + 100, "x", None, False)])
    with pytest.raises(BadCheckpointError, match="file is truncated"):
        reader.raw(r, 0, len(data) + 100)
    reader.close()


@pytest.mark.parametrize("changed", [False, True])
def test_ranges_read_by_several_threads_are_hashed_in_order(tmp_path, changed):
    """Several threads read ahead at once, but a tensor's running hash takes its ranges
    in order: the whole tensor is checked, and a changed byte anywhere is caught."""
    sources, data = _file(tmp_path, 1 << 16)
    h = tensor_hasher()
    h.update(data)
    r = Read(src=0, file="x.bin", offset=0, nbytes=len(data), dtype="U8",
             content_hash=h.hexdigest())
    if changed:
        (tmp_path / "m" / "x.bin").write_bytes(data[:-1] + b"\x00")
    reader = BlockReader(sources)
    ahead = reader.start_read_ahead(1 << 12)   # several 512-byte ranges in flight
    ahead.schedule([(r, a, 512, "x", None, False) for a in range(0, len(data), 512)])
    got = b""
    try:
        for a in range(0, len(data), 512):
            got += bytes(reader.raw(r, a, 512))
    except StaleModelError:
        assert changed
    else:
        assert not changed and got == data and reader.checked_bytes == len(data)
    finally:
        reader.close()
    assert ahead.unused_bytes == 0
