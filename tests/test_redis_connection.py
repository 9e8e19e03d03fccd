"""pushsvc.broker.connection's own packing of PUBLISH: byte for byte what hiredis writes."""

from __future__ import annotations

import hiredis
from hypothesis import given
from hypothesis import strategies as st

from pushsvc.broker.connection import publish_command


@given(channel=st.text(min_size=1), message=st.binary())
def test_publish_command_is_what_hiredis_packs(channel: str, message: bytes) -> None:
    packed = publish_command(channel.encode(), message)
    assert packed == hiredis.pack_command(("PUBLISH", channel, message))


def test_publish_command_reads_back_as_one_command() -> None:
    reader = hiredis.Reader()
    message = b"origin\x00123\x00\x00\x00line one\r\n$5\r\n*2\r\n"  # RESP-looking payload
    reader.feed(publish_command("pushsvc:u:ünï".encode(), message))
    assert reader.gets() == [b"PUBLISH", "pushsvc:u:ünï".encode(), message]
    assert reader.gets() is False
