"""The metadata the archive keeps for one message, read leniently from its raw bytes.

`parse_metadata` never raises: a message is archived byte for byte whatever its
headers look like, and the metadata is a best-effort index over those bytes.
Broken or missing headers give empty fields, never an error.

Only the header block is parsed for header fields; attachments are found by
walking the MIME tree through the part headers and boundary lines, without
decoding any body, so a 30 MB message costs a few `bytes.find` calls. Text is
cleaned for PostgreSQL (no NUL, no lone surrogates) and capped in length.
"""

from __future__ import annotations

import binascii
import email.utils
import itertools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

log = logging.getLogger(__name__)

MAX_TEXT = 2_000
"""Longest subject, sender, Message-ID or single address kept, in characters."""

MAX_ADDRESSES = 500
"""Most addresses kept per list (To, Cc)."""

_MAX_HEADER_BYTES = 512 << 10  # of the message's header block; real ones are a few KB
_MAX_VALUE_BYTES = 64 << 10  # of one subject or sender value, before decoding
_MAX_PART_HEADER_BYTES = 64 << 10
_MAX_MIME_DEPTH = 32
_MAX_MIME_PARTS = 1_000
_MESSAGE_TYPES = ("message/rfc822", "message/global")

# The header fields `_parse` and `_has_attachments` read; the rest are skipped.
_READ_FIELDS = {
    name.encode(): name
    for name in (
        "subject",
        "from",
        "to",
        "cc",
        "date",
        "message-id",
        "content-type",
        "content-disposition",
        "content-transfer-encoding",
    )
}
# Where two line breaks meet (see _block_end).
_BREAK_PAIRS = (b"\n\n", b"\n\r", b"\r\r")
# A header field name (RFC 5322: printable ASCII except the colon).
_FIELD_NAME = re.compile(rb"[!-9;-~]+")
# An RFC 2047 encoded word; encoded text may hold spaces (seen from broken mailers).
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?]*)\?=")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/]")
# Address-list tokens: quoted string, comment, angle address, encoded word,
# separator, a run of anything else, or one stray character.
_ADDRESS_TOKEN = re.compile(
    r'"(?:[^"\\]|\\.)*"?'
    r"|\((?:[^()\\]|\\.)*\)?"
    r"|<[^>]*>?"
    r"|=\?[^?\s]+\?[QqBb]\?[^?]*\?="
    r"|[,:;]"
    r'|[^",:;(<=]+'
    r"|.",
    re.DOTALL,
)
_WHITESPACE = re.compile(r"\s+")
# A date inside a damaged Date value, e.g. two dates run together.
_EMBEDDED_DATE = re.compile(
    r"\d{1,2}\s+[A-Za-z]{3,9}\.?\s+\d{2,4}\s+\d{1,2}:\d{2}(?::\d{2})?"
    r"(?:\s*(?:[+-]\d{4}|[A-Za-z]{1,5}))?"
)
_NUMERIC_DATE = re.compile(
    r"(\d{4})[/.-](\d{1,2})[/.-](\d{1,2})\D{0,20}?(\d{1,2}):(\d{2})(?::(\d{2}))?"
    r"(?:\s*([+-]\d{2}:?\d{2}|[A-Za-z]{1,5}\b))?"
)
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_MIME_TYPE = re.compile(rf"\s*({_TOKEN})\s*/\s*({_TOKEN})")
_DISPOSITION = re.compile(rf"\s*({_TOKEN})")
# Parameters, with or without the ';' that should separate them.
_PARAM = re.compile(rf'({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"?|[^;\s"]*)')

# Labels that mail mislabels: decode with the superset the sender really used.
_CHARSET_SUPERSETS = {
    "us-ascii": "cp1252",
    "ascii": "cp1252",
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "iso-8859-9": "cp1254",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "euc-cn": "gb18030",
    "big5": "big5hkscs",
    "euc-kr": "cp949",
    "ks-c-5601-1987": "cp949",
    "shift-jis": "cp932",
    "x-sjis": "cp932",
    "tis-620": "cp874",
    "iso-8859-11": "cp874",
}

Headers = list[tuple[str, bytes]]
# What email.utils.parsedate_tz returns: a time tuple and the zone offset in seconds.
_DateTuple = tuple[int, int, int, int, int, int, int, int, int, int | None]


@dataclass(frozen=True)
class MessageMetadata:
    """What the archive indexes about one message; the bytes themselves are the blob.

    Text fields are decoded (RFC 2047), unfolded and stripped, "" when absent;
    addresses are kept as written (`Name <addr>` or a bare address), one per entry.
    """

    message_id: str
    subject: str
    from_: str
    to: list[str]
    cc: list[str]
    sent_at: datetime | None  # UTC; None when the Date header is missing or unreadable
    has_attachments: bool
    size_bytes: int


def parse_metadata(raw: bytes) -> MessageMetadata:
    """Read the metadata of the message `raw`; never raises, whatever the bytes."""
    try:
        return _parse(raw)
    except Exception:  # a bug here must not cost the archive a message
        log.exception("could not read the metadata of a %d-byte message", len(raw))
        return MessageMetadata("", "", "", [], [], None, False, len(raw))


def _parse(raw: bytes) -> MessageMetadata:
    headers, body_start = _read_headers(raw, 0, len(raw), _MAX_HEADER_BYTES)
    content_type = _first(headers, "content-type")
    charset = _params(_latin1(content_type or b""))[1].get("charset") or None
    subject = (_first(headers, "subject") or b"")[:_MAX_VALUE_BYTES]
    sender = (_first(headers, "from") or b"")[:_MAX_VALUE_BYTES]
    message_id = _first(headers, "message-id")
    return MessageMetadata(
        message_id=_clean(_text(message_id or b"", charset)),
        subject=_clean(_decode_words(_text(subject, charset)).replace("\t", " ")),
        from_=_clean(_collapse(_decode_words(_text(sender, charset)))),
        to=_addresses(_all(headers, "to"), charset),
        cc=_addresses(_all(headers, "cc"), charset),
        sent_at=_sent_at(_all(headers, "date")),
        has_attachments=_has_attachments(raw, headers, body_start),
        size_bytes=len(raw),
    )


# Header block


def _read_headers(raw: bytes, start: int, end: int, limit: int) -> tuple[Headers, int]:
    """Parse the header block at raw[start:end].

    Returns the fields this module reads (_READ_FIELDS) as (lowercase name,
    unfolded value) pairs in order, and where the body starts. The block ends at
    the first empty line, or at the first line that is neither a field nor a
    continuation (as Python's parser does); a leading mbox "From " line is
    skipped. At most `limit` bytes are read: a longer block is cut there, and the
    message is then treated as having no body.
    """
    headers: list[tuple[str, list[bytes]]] = []
    kept: list[bytes] | None = None  # the pieces of the field being read, if kept
    pos = start
    stop = min(end, start + limit)
    # One C-speed split of the block instead of a regular expression per line.
    for line in raw[start : _block_end(raw, start, stop)].splitlines(keepends=True):
        content = line.rstrip(b"\r\n")  # a line holds one line break at most
        next_pos = pos + len(line)
        # Past the limit (mid-line), keep what was read and ignore the rest.
        if next_pos == stop < end and len(content) == len(line):
            next_pos = end
        if not content:
            return _joined(headers), next_pos
        if content[:1] in (b" ", b"\t"):
            if kept is not None:
                kept.append(content)
        else:
            name, colon, value = content.partition(b":")
            name = name.rstrip(b" \t").lower()
            if colon and name in _READ_FIELDS:
                kept = [value]
                headers.append((_READ_FIELDS[name], kept))
            elif colon and _FIELD_NAME.fullmatch(name):
                kept = None  # a field nobody reads (Received, DKIM-Signature, ...)
            elif not (pos == start and content.startswith(b"From ")):
                return _joined(headers), pos
        pos = next_pos
    return _joined(headers), end


def _block_end(raw: bytes, start: int, stop: int) -> int:
    """An end for raw[start:stop] that includes its first empty line, if any.

    Two line breaks in a row ("\r\n", "\r" and "\n" all break a line) always
    show one of "\n\n", "\n\r" or "\r\r" where they meet; the third byte
    after it completes a "\r\n" that may follow. The usual "\r\n\r\n" is
    looked for first, to bound the other searches to the header block.
    """
    usual = raw.find(b"\r\n\r\n", start, stop)
    bound = stop if usual < 0 else usual + 4
    found = [i for i in (raw.find(pair, start, bound) for pair in _BREAK_PAIRS) if i >= 0]
    return min(min(found) + 3, stop) if found else stop


def _joined(headers: list[tuple[str, list[bytes]]]) -> Headers:
    return [(name, b"".join(pieces).strip(b" \t")) for name, pieces in headers]


def _first(headers: Headers, name: str) -> bytes | None:
    return next((value for key, value in headers if key == name), None)


def _all(headers: Headers, name: str) -> list[bytes]:
    return [value for key, value in headers if key == name]


# Text


def _latin1(data: bytes) -> str:
    return data.decode("latin-1")


def _text(data: bytes, charset: str | None) -> str:
    """Decode a raw header value: UTF-8 if it is, else the body's charset, else cp1252."""
    if data.isascii():
        return data.decode("ascii")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if charset:
        decoded = _decode_as(data, charset, "strict")
        if decoded is not None:
            return decoded
    return _fallback(data)


def _fallback(data: bytes) -> str:
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decode_as(data: bytes, charset: str, errors: str) -> str | None:
    """Decode with a charset named by the message, or None if it is unknown or fails."""
    label = charset.strip().strip("\"'").lower()
    label = _CHARSET_SUPERSETS.get(label.replace("_", "-"), label)
    try:
        return data.decode(label, errors)
    except Exception:  # LookupError, UnicodeError, ValueError from odd codec names
        return None


def _decode_payload(data: bytes, charset: str) -> str:
    """Decode the bytes of an encoded word, replacing what does not decode."""
    decoded = _decode_as(data, charset, "strict")
    if decoded is not None:
        return decoded
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    decoded = _decode_as(data, charset, "replace")
    return decoded if decoded is not None else _fallback(data)


def _decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words leniently.

    Whitespace between adjacent encoded words is dropped, and adjacent words in
    one charset are decoded together (mailers split multi-byte characters across
    words). A word that cannot be decoded is kept as written.
    """
    if "=?" not in text:
        return text
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    last = 0
    after_word = False

    def flush() -> None:
        if pending:
            out.append(_decode_payload(bytes(pending), pending_charset))
            pending.clear()

    for word in _ENCODED_WORD.finditer(text):
        between = text[last : word.start()]
        if not (after_word and (not between or between.isspace())):
            flush()
            out.append(between)
        charset = word.group(1).split("*", 1)[0]  # drop an RFC 2231 language
        if word.group(2) in "Qq":
            data: bytes | None = _q_decode(word.group(3))
        else:
            data = _b_decode(word.group(3))
        if data is None:
            flush()
            out.append(word.group(0))
            after_word = False
        else:
            if pending and charset.lower() != pending_charset.lower():
                flush()
            pending += data
            pending_charset = charset
            after_word = True
        last = word.end()
    flush()
    out.append(text[last:])
    return "".join(out)


def _q_decode(encoded: str) -> bytes:
    data = encoded.encode("utf-8", "replace").replace(b"_", b" ")
    return _Q_ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), data)


def _b_decode(encoded: str) -> bytes | None:
    data = _NOT_BASE64.sub("", encoded)
    if len(data) % 4 == 1:  # one stray character cannot encode anything
        data = data[:-1]
    data += "=" * (-len(data) % 4)
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        return None


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text)


def _clean(text: str) -> str:
    """Make `text` storable: no NUL or line breaks, no lone surrogates, capped."""
    text = text.replace("\x00", "")
    if "\r" in text or "\n" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    text = text.strip()[:MAX_TEXT].rstrip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # e.g. from a "utf-16" or "unicode-escape" label
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


# Addresses


def _addresses(values: list[bytes], charset: str | None) -> list[str]:
    found: list[str] = []
    for value in values:
        for entry in _split_addresses(_text(value, charset)):
            cleaned = _clean(_collapse(_decode_words(entry)))
            if cleaned:
                found.append(cleaned)
                if len(found) >= MAX_ADDRESSES:
                    return found
    return found


def _split_addresses(text: str) -> Iterator[str]:
    """Split an address list at top-level commas, as written.

    Quoted strings, comments, angle addresses and encoded words are kept whole;
    a group's name (`undisclosed-recipients:`) is dropped, its members kept.
    """
    current: list[str] = []
    for token in _ADDRESS_TOKEN.finditer(text):
        piece = token.group(0)
        if piece in (",", ";"):
            yield "".join(current)
            current = []
        elif piece == ":":
            current = []
        else:
            current.append(piece)
    yield "".join(current)


# Date


def _sent_at(values: list[bytes]) -> datetime | None:
    """The first readable date among the Date headers, in UTC."""
    for value in values:
        text = _latin1(value[:1_000]).replace("\x00", "")
        embedded = (m.group(0) for m in _EMBEDDED_DATE.finditer(text))
        for candidate in itertools.chain((text,), embedded):
            when = _to_datetime(candidate)
            if when is not None:
                return when
    return None


def _to_datetime(text: str) -> datetime | None:
    when = _from_parts(_parsedate(text))
    if when is None:
        when = _iso_datetime(text) or _numeric_datetime(text)
    return when


def _parsedate(text: str) -> _DateTuple | None:
    try:
        return email.utils.parsedate_tz(text)
    except Exception:  # the stdlib has raised on odd input in past releases
        return None


def _from_parts(parts: _DateTuple | None) -> datetime | None:
    if parts is None:
        return None
    year, month, day, hour, minute, second = parts[:6]
    offset = parts[9] or 0
    if abs(offset) >= 24 * 3600:  # not a real zone: read the time as UTC
        offset = 0
    try:
        when = datetime(year, month, day, hour, minute, min(second, 59), tzinfo=UTC)
        return when - timedelta(seconds=offset)
    except (ValueError, OverflowError):
        return None


def _numeric_datetime(text: str) -> datetime | None:
    """Read `2002/09/14 Sat 02:29:32 CDT` and the like, seen from some mailers."""
    found = _NUMERIC_DATE.search(text)
    if found is None:
        return None
    year, month, day, hour, minute, second, zone = found.groups()
    offset: int | None = 0
    if zone and zone[0] in "+-":
        digits = zone[1:].replace(":", "")
        offset = int(digits[:2]) * 3600 + int(digits[2:]) * 60
        offset = -offset if zone[0] == "-" else offset
    elif zone:
        named = _parsedate(f"1 Jan 2000 00:00:00 {zone}")
        offset = named[9] if named is not None else 0
    numbers = (int(year), int(month), int(day), int(hour), int(minute), int(second or 0))
    return _from_parts((*numbers, 0, 1, -1, offset))


def _iso_datetime(text: str) -> datetime | None:
    text = text.strip()
    if not text[:4].isdigit():
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    try:
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


# Attachments


def _has_attachments(raw: bytes, headers: Headers, body_start: int) -> bool:
    """Whether any MIME part is an attachment: `Content-Disposition: attachment`,
    or a part that is neither text nor multipart and has a file name."""
    # (headers, body start, body end, depth, type when Content-Type is missing)
    stack = [(headers, body_start, len(raw), 0, "text/plain")]
    budget = _MAX_MIME_PARTS
    while stack:
        part_headers, start, end, depth, default_type = stack.pop()
        mime_type, type_params = _params(_latin1(_first(part_headers, "content-type") or b""))
        mime_type = mime_type or default_type
        disposition, disposition_params = _params(
            _latin1(_first(part_headers, "content-disposition") or b""), disposition=True
        )
        if disposition == "attachment":
            return True
        maintype, _, subtype = mime_type.partition("/")
        if maintype == "multipart":
            boundary = type_params.get("boundary", "")
            if not boundary or depth >= _MAX_MIME_DEPTH:
                continue
            child_type = "message/rfc822" if subtype == "digest" else "text/plain"
            children = []
            for child_start, child_end in _split_parts(raw, start, end, boundary):
                budget -= 1
                if budget < 0:
                    return False
                child_headers, child_body = _read_headers(
                    raw, child_start, child_end, _MAX_PART_HEADER_BYTES
                )
                children.append((child_headers, child_body, child_end, depth + 1, child_type))
            stack.extend(reversed(children))
        elif maintype != "text" and (
            _has_name(disposition_params, "filename") or _has_name(type_params, "name")
        ):
            return True
        elif mime_type in _MESSAGE_TYPES and depth < _MAX_MIME_DEPTH:
            # A forwarded or bounced message: its attachments travel with this one.
            encoding = _latin1(_first(part_headers, "content-transfer-encoding") or b"")
            if encoding.strip().lower() not in ("", "7bit", "8bit", "binary"):
                continue
            budget -= 1
            if budget < 0:
                return False
            inner_headers, inner_body = _read_headers(raw, start, end, _MAX_PART_HEADER_BYTES)
            stack.append((inner_headers, inner_body, end, depth + 1, "text/plain"))
    return False


def _params(value: str, disposition: bool = False) -> tuple[str, dict[str, str]]:
    """Split a Content-Type (or, with `disposition`, Content-Disposition) value
    into its lowercase type ("" if unreadable) and its parameters (lowercase
    names, unquoted values, first occurrence wins)."""
    head = (_DISPOSITION if disposition else _MIME_TYPE).match(value)
    kind = ""
    if head is not None:
        kind = "/".join(head.groups()).lower()
    params: dict[str, str] = {}
    for param in _PARAM.finditer(value, head.end() if head else 0):
        name = param.group(1).lower()
        raw_value = param.group(2)
        if raw_value.startswith('"'):
            raw_value = re.sub(r"\\(.)", r"\1", raw_value[1:].removesuffix('"'), flags=re.DOTALL)
        params.setdefault(name, raw_value.strip())
    return kind, params


def _has_name(params: dict[str, str], key: str) -> bool:
    """Whether `params` name a file under `key`, plain or RFC 2231 (`key*`, `key*0`)."""
    return any(
        (name == key or name.startswith(key + "*")) and value for name, value in params.items()
    )


def _split_parts(raw: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]]:
    """The (start, end) of each body part of the multipart body raw[start:end].

    A delimiter is `--boundary` at the start of a line, optionally followed by
    `--` (the last one) and spaces; a missing closing delimiter ends the last
    part at the end of the body, as Python's parser does.
    """
    needle = b"--" + boundary.encode("latin-1")
    # (line start, where the next part begins, whether it is the closing one)
    delimiters: list[tuple[int, int, bool]] = []
    pos = start
    while pos < end and len(delimiters) <= _MAX_MIME_PARTS:
        found = raw.find(needle, pos, end)
        if found < 0:
            break
        pos = found + len(needle)
        if found != start and raw[found - 1] not in (0x0A, 0x0D):
            continue
        closing = raw.startswith(b"--", pos, end)
        after = pos + 2 if closing else pos
        while after < end and raw[after] in (0x20, 0x09):
            after += 1
        if after < end and raw[after] not in (0x0A, 0x0D):
            continue  # a longer boundary that starts with this one
        after = min(end, after + (2 if raw.startswith(b"\r\n", after, end) else 1))
        delimiters.append((found, after, closing))
        if closing:
            break
        pos = after
    parts = []
    for index, (_, part_start, closing) in enumerate(delimiters):
        if closing:
            break
        part_end = end
        if index + 1 < len(delimiters):
            part_end = delimiters[index + 1][0]
            # The line break before a delimiter belongs to the delimiter.
            if part_end > part_start and raw[part_end - 1] == 0x0A:
                part_end -= 1
            if part_end > part_start and raw[part_end - 1] == 0x0D:
                part_end -= 1
        parts.append((part_start, part_end))
    return parts
