"""Our MAIL/RCPT address parse (``_Server._getaddr``, which skips aiosmtpd's per-call class)
answers exactly as aiosmtpd's own does, for good, odd and refused addresses."""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP

from mailrouter.ingest.smtp import _Server

ADDRESSES = [
    "",
    "<>",
    "<carol@customer.test>",
    "<carol@customer.test> SIZE=4096 BODY=8BITMIME",
    "carol@customer.test",
    "  <carol@customer.test>",
    '<"carol smith"@customer.test>',
    "<@relay.test:carol@customer.test>",
    "<carol@[192.0.2.1]>",
    "<carol>",
    "<carol@customer.test",
    "carol@@customer.test",
    "<" + "c" * 65 + "@customer.test>",  # a local part over RFC 5321's 64
    "<" + "c" * 64 + "@customer.test>",
    "<carøl@customer.test>",
    "not an address at all",
]


class _Probe(_Server):
    """Only what _getaddr reads: the local-part limit."""

    def __init__(self) -> None:  # no session, no handler
        self.local_part_limit = 64


@pytest.mark.parametrize("arg", ADDRESSES)
def test_an_address_is_parsed_as_aiosmtpd_parses_it(arg: str) -> None:
    probe = _Probe()
    assert probe._getaddr(arg) == SMTP._getaddr(probe, arg)
