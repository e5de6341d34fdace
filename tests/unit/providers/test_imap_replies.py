"""Reading UID FETCH replies as imaplib hands them over (without a server: the
integration tests cover Dovecot's own replies)."""

from __future__ import annotations

from ingestion_grpc.providers.imap_fetch import _bodies_by_uid

FIRST = b"From: a@example.com\r\nSubject: one\r\n\r\nbody {1}\r\n)"
SECOND = b"Subject: two\r\n\r\nUID 99 BODY[] {3}\r\n"


def test_the_usual_shape_is_read_by_uid() -> None:
    replies = [
        (b"1 (UID 7 BODY[] {%d}" % len(FIRST), FIRST),
        b")",
        b"5 (FLAGS (\\Seen))",  # an unsolicited update of another message
        (b"2 (UID 8 BODY[] {%d}" % len(SECOND), SECOND),
        b")",
    ]
    assert _bodies_by_uid(replies) == {7: FIRST, 8: SECOND}


def test_a_uid_after_the_literal_goes_through_imapclients_parser() -> None:
    replies = [
        (b"1 (BODY[] {%d}" % len(FIRST), FIRST),
        b" UID 7)",
        (b"2 (UID 8 BODY[] {%d}" % len(SECOND), SECOND),
        b")",
    ]
    assert _bodies_by_uid(replies) == {7: FIRST, 8: SECOND}


def test_no_replies_no_bodies() -> None:
    assert _bodies_by_uid([]) == {}
