"""parse_metadata: every real message of the shared corpora, then crafted damage.

The corpora live beside the repository (`<repo>/../shared/corpora`) and are never
copied into it. The function must never raise and never fall back to its
last-resort path (which logs) on real mail.
"""

from __future__ import annotations

import logging
import mailbox
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingestion_grpc.archive.metadata import (
    MAX_ADDRESSES,
    MAX_TEXT,
    MessageMetadata,
    parse_metadata,
)

CORPORA = Path(__file__).resolve().parents[3].parent / "shared" / "corpora"
HAM = "spamassassin-easy-ham-1.mbox"
SPAM = "spamassassin-spam-1.mbox"
LOGGER = "ingestion_grpc.archive.metadata"


def _load(name: str) -> list[bytes]:
    path = CORPORA / name
    if not path.is_file():
        pytest.fail(f"test corpus missing: {path} (shared/ must sit beside the repository)")
    box = mailbox.mbox(path, create=False)
    try:
        return [box.get_bytes(key) for key in box.iterkeys()]
    finally:
        box.close()


@pytest.fixture(scope="module")
def ham() -> list[bytes]:
    return _load(HAM)


@pytest.fixture(scope="module")
def spam() -> list[bytes]:
    return _load(SPAM)


def _assert_storable(meta: MessageMetadata, raw: bytes) -> None:
    assert meta.size_bytes == len(raw)
    for text in (meta.message_id, meta.subject, meta.from_, *meta.to, *meta.cc):
        assert isinstance(text, str)
        assert "\x00" not in text and "\r" not in text and "\n" not in text
        assert len(text) <= MAX_TEXT
        text.encode("utf-8")  # no lone surrogates: PostgreSQL must accept it
    assert len(meta.to) <= MAX_ADDRESSES and len(meta.cc) <= MAX_ADDRESSES
    if meta.sent_at is not None:
        offset = meta.sent_at.utcoffset()
        assert offset is not None and offset.total_seconds() == 0


# The corpora


@pytest.mark.parametrize(
    ("name", "count", "with_attachments"),
    [(HAM, 2_500, 15), (SPAM, 500, 8)],
)
def test_every_corpus_message_parses(
    name: str, count: int, with_attachments: int, caplog: pytest.LogCaptureFixture
) -> None:
    raws = _load(name)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        metas = [parse_metadata(raw) for raw in raws]
    assert len(metas) == count
    assert [r for r in caplog.records if r.name == LOGGER] == []
    for meta, raw in zip(metas, raws, strict=True):
        _assert_storable(meta, raw)
    # Every message of these corpora has a Message-ID, a sender and a readable date.
    assert all(meta.message_id for meta in metas)
    assert all(meta.from_ for meta in metas)
    assert all(meta.sent_at is not None for meta in metas)
    # Same count as Python's email package walking the same rule over the tree.
    assert sum(meta.has_attachments for meta in metas) == with_attachments


def test_known_ham_messages(ham: list[bytes]) -> None:
    first = parse_metadata(ham[0])
    assert first == MessageMetadata(
        message_id="<13258.1030015585@munnari.OZ.AU>",
        subject="Re: New Sequences Window",
        from_="Robert Elz <kre@munnari.OZ.AU>",
        to=["Chris Garrigues <cwg-dated-1030377287.06fa6d@DeepEddy.Com>"],
        cc=["exmh-workers@spamassassin.taint.org"],
        sent_at=datetime(2002, 8, 22, 11, 26, 25, tzinfo=UTC),
        has_attachments=False,
        size_bytes=len(ham[0]),
    )
    # An 8-bit iso-8859-1 subject, not an encoded word.
    pound = parse_metadata(ham[2025])
    assert pound.message_id == "<200209270801.g8R813g00801@dogma.slashnull.org>"
    assert pound.subject == "Gambler wins £7,000 - and spends it all on horse shiat"
    # A bounce whose only attachment is inside the returned message/rfc822.
    bounce = parse_metadata(ham[1541])
    assert bounce.message_id == "<15304473447566@buffy.jpci.net>"
    assert bounce.subject == "Failed mail: Banned or potentially offensive material"
    assert bounce.has_attachments


def test_known_spam_messages(spam: list[bytes]) -> None:
    korean = parse_metadata(spam[34])  # ks_c_5601-1987 encoded words
    assert korean.message_id == "<20020719072300.7A551DE087@ccsun37.cc.ntu.edu.tw>"
    assert korean.subject == "[광고] 요즘 뜨는 직종 Best 5 & 자격증 따기 열풍"
    assert korean.from_ == "교육팀 <master@ibd.pe.kr>"
    odd_date = parse_metadata(spam[301])  # "Date: 2002/09/14 Sat 02:29:32 CDT"
    assert odd_date.message_id == "<p4kx9.mt1pdr@prodigy.net>"
    assert odd_date.sent_at == datetime(2002, 9, 14, 7, 29, 32, tzinfo=UTC)
    undisclosed = parse_metadata(spam[21])  # "To: undisclosed-recipients:;"
    assert undisclosed.to == []


def test_damaged_corpus_messages_never_raise(
    ham: list[bytes], spam: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """Real messages cut and spliced with the bytes parsers trip on."""
    pieces = [b"\r", b"\n", b"\r\n", b":", b"=?", b"?=", b"?B?", b"--", b"\x00", b"\xff", b'"']
    pieces += [b"<", b"(", b",", b";", b"boundary=", b"multipart/mixed", b"attachment"]
    rng = random.Random(20020822)
    corpus = ham[::50] + spam[::10]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(1_500):
            raw = bytearray(rng.choice(corpus)[:3_000])
            for _ in range(rng.randint(1, 20)):
                at = rng.randint(0, len(raw))
                if rng.random() < 0.6:
                    raw[at:at] = rng.choice(pieces)
                else:
                    del raw[at : at + rng.randint(1, 20)]
            _assert_storable(parse_metadata(bytes(raw)), bytes(raw))
    assert [r for r in caplog.records if r.name == LOGGER] == []


# Crafted edge cases


def test_empty_input() -> None:
    assert parse_metadata(b"") == MessageMetadata("", "", "", [], [], None, False, 0)


@pytest.mark.parametrize(
    "raw",
    [b"just a body line\nand another\n", b"\n\nSubject: in the body\n", b"\x00", b"\r\n"],
    ids=["text", "blank-first", "nul", "crlf"],
)
def test_no_headers(raw: bytes) -> None:
    meta = parse_metadata(raw)
    assert (meta.message_id, meta.subject, meta.from_, meta.sent_at) == ("", "", "", None)
    assert meta.size_bytes == len(raw)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_line_endings_and_folding(eol: bytes) -> None:
    raw = eol.join(
        [
            b"From: Alice Example",
            b"  <alice@example.com>",
            b'To: bob@example.com, "Doe, Jane" <jane@example.com>,',
            b"\tcarol@example.com",
            b"Cc: Dave <dave@example.com>",
            b"Subject: a folded",
            b" subject",
            b"Message-ID:",
            b" <folded@example.com>",
            b"Date: Thu, 22 Aug 2002 18:26:25 +0700",
            b"",
            b"Subject: not a header, the body",
        ]
    )
    meta = parse_metadata(raw)
    assert meta.from_ == "Alice Example <alice@example.com>"
    assert meta.to == ["bob@example.com", '"Doe, Jane" <jane@example.com>', "carol@example.com"]
    assert meta.cc == ["Dave <dave@example.com>"]
    assert meta.subject == "a folded subject"
    assert meta.message_id == "<folded@example.com>"
    assert meta.sent_at == datetime(2002, 8, 22, 11, 26, 25, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "subject"),
    [
        (b"Subject: one\r\n\n continued?\r\n", "one"),
        (b"Subject: two\n\r\n continued?\n", "two"),
        (b"Subject: three\r\r\n continued?\r", "three"),
        (b"Subject: four\r\n\r\n\tcontinued?", "four"),
        (b"Subject: five\r\n continued\r\n\r\n", "five continued"),
    ],
)
def test_the_header_block_ends_at_the_first_empty_line(raw: bytes, subject: str) -> None:
    """Whatever the mix of line breaks, a body line that starts with white space
    does not continue the last header."""
    assert parse_metadata(raw).subject == subject


def test_mbox_from_line_is_skipped() -> None:
    meta = parse_metadata(b"From someone@example.com  Thu Aug 22 12:36:23 2002\nSubject: hi\n\nx")
    assert meta.subject == "hi"


@pytest.mark.parametrize(
    ("dates", "expected"),
    [
        (
            [b"Mon, 14 May 2001 16:39:00 -0700 (PDT)", b"Tue, 15 May 2001 10:00:00 +0000"],
            datetime(2001, 5, 14, 23, 39, tzinfo=UTC),
        ),
        ([b"garbage", b"Tue, 15 May 2001 10:00:00 +0000"], datetime(2001, 5, 15, 10, tzinfo=UTC)),
        (
            [b"Mon, 14 May 2001 16:39:00 -0700 (PDT)Date: Mon, 14 May 2001 16:39:00 -0700"],
            datetime(2001, 5, 14, 23, 39, tzinfo=UTC),
        ),
        ([b"Date: Mon, 14 May 2001 16:39:00 -0700"], datetime(2001, 5, 14, 23, 39, tzinfo=UTC)),
        (  # as in the transport headers of enron.pst: two dates in one value
            [b"Thu, 23 Aug 2001 15:49:51 -0700 (PDT),Thu, 23 Aug 2001 15:49:51 -0600"],
            datetime(2001, 8, 23, 22, 49, 51, tzinfo=UTC),
        ),
        (
            [b"Mon, 22 Oct 2001 13:06:22 -0700 (PDT) Mon, 22 Oct 2001 13:06:22 -0500"],
            datetime(2001, 10, 22, 20, 6, 22, tzinfo=UTC),
        ),
        ([b"14 May 2001 16:39:00"], datetime(2001, 5, 14, 16, 39, tzinfo=UTC)),  # no zone: UTC
        ([b"2001-05-14T16:39:00+02:00"], datetime(2001, 5, 14, 14, 39, tzinfo=UTC)),
        ([b"Mon, 31 Feb 2001 10:00:00 +0000"], None),
        ([b"Sat, 30 Jun 2001 23:59:60 +0000"], datetime(2001, 6, 30, 23, 59, 59, tzinfo=UTC)),
        ([b"0001-01-01T00:00:00+01:00"], None),  # before datetime.min once in UTC
        ([b"not a date at all"], None),
        ([b""], None),
    ],
    ids=[
        "doubled",
        "first-unreadable",
        "run-together",
        "repeated-name",
        "pst-comma",
        "pst-space",
        "no-zone",
        "iso",
        "impossible",
        "leap-second",
        "underflow",
        "garbage",
        "empty",
    ],
)
def test_dates(dates: list[bytes], expected: datetime | None) -> None:
    raw = b"".join(b"Date: " + value + b"\r\n" for value in dates) + b"\r\nbody"
    assert parse_metadata(raw).sent_at == expected


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (b"=?utf-8?Q?caf=C3=A9?=", "café"),
        (b"=?iso-8859-1?B?Y2Fm6Q==?=", "café"),
        (b"=?utf-8?Q?a?= =?utf-8?Q?b?= c", "ab c"),  # space between words is dropped
        (b"=?utf-8?B?5pel?= =?utf-8?B?5pys?=", "日本"),
        (b"=?utf-8?Q?=E6=97?= =?utf-8?Q?=A5?=", "日"),  # a character split across words
        (b"=?x-unknown?Q?abc?=", "abc"),
        (b"=?utf-8?B?!!!not*base64?=", None),  # invalid base64: decoded with replacement
        (b"=?utf-8?B?w6k?=", "é"),  # missing padding
        (b"=?base64?Q?abc?=", "abc"),  # not a text codec
        (b"=?utf-16?Q?=00=D8?=", None),  # lone surrogate
        (b"=?utf-8?Q?unterminated", "=?utf-8?Q?unterminated"),
        (b"Re: \xe9t\xe9", "Re: été"),  # raw 8-bit, not UTF-8: cp1252
        (b"Re: \xc3\xa9t\xc3\xa9", "Re: été"),  # raw UTF-8
        (b"with a\x00NUL", "with aNUL"),
        (b"=?utf-8?Q?nul=00inside?=", "nulinside"),
        (b"tab\tinside", "tab inside"),
    ],
)
def test_subject_decoding(subject: bytes, expected: str | None) -> None:
    meta = parse_metadata(b"Subject: " + subject + b"\r\n\r\nbody")
    assert "\x00" not in meta.subject
    meta.subject.encode("utf-8")
    if expected is not None:
        assert meta.subject == expected
    else:
        assert meta.subject  # something readable, and no exception


def test_8bit_header_uses_the_declared_charset() -> None:
    raw = (
        b"Subject: \xc4\xe3\xba\xc3\r\n"  # GB2312 for "hello" in Chinese
        b"Content-Type: text/plain; charset=gb2312\r\n\r\nbody"
    )
    assert parse_metadata(raw).subject == "你好"


def test_broken_header_lines() -> None:
    raw = (
        b"Subject: kept\n"
        b"Bad Header Without Colon\n"  # ends the header block, as Python's parser does
        b"From: after@example.com\n\nbody"
    )
    meta = parse_metadata(raw)
    assert meta.subject == "kept"
    assert meta.from_ == ""


@pytest.mark.parametrize("stray", [b"Cc", b"X-Unread", b"Received"])
def test_a_field_name_without_a_colon_ends_the_header_block(stray: bytes) -> None:
    raw = b"Subject: kept\r\n" + stray + b"\r\nFrom: after@example.com\r\n\r\nbody"
    meta = parse_metadata(raw)
    assert (meta.subject, meta.from_, meta.cc) == ("kept", "", [])


def test_continuation_lines_of_skipped_fields_are_not_read() -> None:
    raw = (
        b"Received: from a.example.com\r\n"
        b"\tby b.example.com; Thu, 22 Aug 2002 07:36:16 -0400\r\n"
        b"Subject: kept\r\n"
        b" and folded\r\n"
        b"X-Spam: Subject: not this\r\n"
        b"\tTo: nor this <x@example.com>\r\n"
        b"\r\nbody"
    )
    meta = parse_metadata(raw)
    assert (meta.subject, meta.to, meta.sent_at) == ("kept and folded", [], None)


def test_caps_long_values() -> None:
    many = b", ".join(b"u%d@example.com" % i for i in range(2_000))
    raw = b"Subject: " + b"x" * 50_000 + b"\nFrom: " + b"y" * 50_000 + b"\nTo: " + many + b"\n\n"
    meta = parse_metadata(raw)
    assert len(meta.subject) == MAX_TEXT
    assert len(meta.from_) == MAX_TEXT
    assert len(meta.to) == MAX_ADDRESSES
    assert meta.to[0] == "u0@example.com"


def test_addresses() -> None:
    raw = (
        b"From: =?utf-8?Q?J=C3=BCrgen?= <j@example.com>\n"
        b"To: undisclosed-recipients:;\n"
        b"To: =?utf-8?Q?M=C3=BCller=2C_Hans?= <h@example.com>, plain@example.com (comment, here)\n"
        b"Cc: Team: a@example.com, b@example.com;, c@example.com\n\n"
    )
    meta = parse_metadata(raw)
    assert meta.from_ == "Jürgen <j@example.com>"
    assert meta.to == ["Müller, Hans <h@example.com>", "plain@example.com (comment, here)"]
    assert meta.cc == ["a@example.com", "b@example.com", "c@example.com"]


MIXED_WITH_ATTACHMENT = b"""\
From: a@example.com
Subject: report
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

preamble
--outer
Content-Type: multipart/alternative; boundary="inner"

--inner
Content-Type: text/plain

text
--inner
Content-Type: text/html

<p>html</p>
--inner--
--outer
Content-Type: application/pdf; name="report.pdf"
Content-Transfer-Encoding: base64

JVBERi0xLjQK
--outer--
epilogue
"""

ALTERNATIVE_ONLY = b"""\
Content-Type: multipart/alternative; boundary=b

--b
Content-Type: text/plain; charset=utf-8

plain
--b
Content-Type: text/html; charset=utf-8

<p>html</p>
--b--
"""


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (MIXED_WITH_ATTACHMENT, True),
        (MIXED_WITH_ATTACHMENT.replace(b"\n", b"\r\n"), True),
        (ALTERNATIVE_ONLY, False),
        (ALTERNATIVE_ONLY.replace(b"\n", b"\r\n"), False),
        (
            ALTERNATIVE_ONLY.replace(
                b"Content-Type: text/html; charset=utf-8",
                b"Content-Type: text/html\nContent-Disposition: attachment",
            ),
            True,
        ),
        (
            ALTERNATIVE_ONLY.replace(
                b"Content-Type: text/html; charset=utf-8",
                b"Content-Type: image/png\nContent-Disposition: inline; filename*=utf-8''a.png",
            ),
            True,
        ),
        (  # a text part with a name is a body, not an attachment
            ALTERNATIVE_ONLY.replace(b"charset=utf-8\n\nplain", b'name="a.txt"\n\nplain'),
            False,
        ),
        (b"Content-Type: application/zip; name=x.zip\n\nPK", True),
        (b"Content-Type: multipart/mixed\n\n--b\nContent-Type: image/gif; name=a\n\n", False),
        (  # the closing delimiter is missing: the last part runs to the end
            b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\nx\n--b\n"
            b"Content-Disposition: attachment\n\ny",
            True,
        ),
        (  # a line that only starts with the boundary is not a delimiter
            b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\n--bb\n"
            b"Content-Disposition: attachment\n\n--b--\n",
            False,
        ),
        (  # parameters without the ';' between them (seen in spam)
            b'Content-Type: multipart/mixed boundary="b"\n\n--b\n'
            b"Content-Disposition: attachment\n\n--b--\n",
            True,
        ),
    ],
    ids=[
        "mixed-LF",
        "mixed-CRLF",
        "alternative-LF",
        "alternative-CRLF",
        "disposition-attachment",
        "inline-image-with-filename",
        "named-text",
        "single-part-zip",
        "no-boundary",
        "unclosed",
        "longer-boundary",
        "missing-semicolon",
    ],
)
def test_has_attachments(raw: bytes, expected: bool) -> None:
    assert parse_metadata(raw).has_attachments is expected


def test_deeply_nested_multiparts_are_bounded() -> None:
    level = b"--b\nContent-Type: multipart/mixed; boundary=b\n\n"
    raw = b"Content-Type: multipart/mixed; boundary=b\n\n" + level * 10_000
    assert parse_metadata(raw).has_attachments is False


def test_large_message_is_fast() -> None:
    attachment = b"QUJD" * 19 + b"\r\n"
    body = attachment * (30_000_000 // len(attachment))
    raw = (
        b"From: a@example.com\r\nSubject: big\r\n"
        b'Content-Type: multipart/mixed; boundary="XYZ"\r\n\r\n'
        b"--XYZ\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b"--XYZ\r\nContent-Type: application/octet-stream; name=big.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + body + b"\r\n--XYZ--\r\n"
    )
    assert len(raw) > 30_000_000
    started = datetime.now(UTC)
    meta = parse_metadata(raw)
    elapsed = (datetime.now(UTC) - started).total_seconds()
    assert meta.has_attachments and meta.subject == "big" and meta.size_bytes == len(raw)
    assert elapsed < 1.0, f"{elapsed:.2f}s for a 30 MB message"
