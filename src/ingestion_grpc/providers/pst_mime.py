"""pst_import: one PST item rebuilt as RFC 822 bytes, and the MAPI property access it needs.

`build_pst_message` is deterministic: the same item gives the same bytes on every
import, so the archive's (source, mailbox, sha256) key keeps a second import of
the same file from archiving anything twice. Reading the file (folders, order,
cursors) is `providers/pst.py`.
"""

from __future__ import annotations

import base64
import email.header
import email.utils
import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ingestion_grpc.errors import ProviderDataError

logger = logging.getLogger(__name__)

# MAPI property tags (the property id; libpff matches any value type).
PR_MESSAGE_CLASS = 0x001A
PR_SENT_REPRESENTING_NAME = 0x0042
PR_SENT_REPRESENTING_EMAIL = 0x0065
PR_SENDER_NAME = 0x0C1A
PR_SENDER_EMAIL = 0x0C1F
PR_SENDER_SMTP = 0x5D01
PR_SENT_REPRESENTING_SMTP = 0x5D02
PR_SUBJECT = 0x0037
PR_TRANSPORT_HEADERS = 0x007D
PR_BODY = 0x1000
PR_HTML = 0x1013
PR_INTERNET_MESSAGE_ID = 0x1035
PR_IN_REPLY_TO = 0x1042
PR_REFERENCES = 0x1039
PR_INTERNET_CPID = 0x3FDE
PR_DISPLAY_NAME = 0x3001
PR_ADDRTYPE = 0x3002
PR_EMAIL_ADDRESS = 0x3003
PR_SMTP_ADDRESS = 0x39FE
PR_RECIPIENT_TYPE = 0x0C15
PR_ATTACH_FILENAME = 0x3704
PR_ATTACH_METHOD = 0x3705
PR_ATTACH_LONG_FILENAME = 0x3707
PR_ATTACH_MIME_TAG = 0x370E
PR_ATTACH_CONTENT_ID = 0x3712
ATTACH_EMBEDDED_MSG = 5
ATTACH_BY_REFERENCE = frozenset({2, 3, 4, 7})  # by reference ... by web reference

# Header fields of the transport headers that the rebuilt MIME structure replaces.
MIME_FIELDS = frozenset({"content-type", "mime-version", "content-transfer-encoding"})
_HEADER_START = re.compile(r"[\x21-\x39\x3b-\x7e]+:")
_MIME_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Windows code pages that have a MIME charset name other than "cpNNNN".
CODEPAGE_CHARSETS = {
    65001: "utf-8",
    20127: "us-ascii",
    1200: "utf-16le",
    1201: "utf-16be",
    28591: "iso-8859-1",
    28592: "iso-8859-2",
    28595: "iso-8859-5",
    28597: "iso-8859-7",
    28599: "iso-8859-9",
    28605: "iso-8859-15",
    20866: "koi8-r",
    21866: "koi8-u",
    932: "shift_jis",
    936: "gb2312",
    949: "ks_c_5601-1987",
    950: "big5",
    50220: "iso-2022-jp",
    51932: "euc-jp",
    51949: "euc-kr",
    52936: "hz-gb-2312",
    54936: "gb18030",
}


# -- properties


def _entry(item: Any, tag: int) -> Any:
    try:
        if not item.number_of_record_sets:
            return None
        return item.get_record_set(0).get_entry_by_type(tag)
    except (OSError, RuntimeError, ValueError):
        return None


def prop_bytes(item: Any, tag: int) -> bytes | None:
    entry = _entry(item, tag)
    if entry is None:
        return None
    data = entry.data
    return bytes(data) if data is not None else None


def _prop_text(item: Any, tag: int) -> str | None:
    entry = _entry(item, tag)
    if entry is None:
        return None
    try:
        text = entry.get_data_as_string()
    except (OSError, RuntimeError, ValueError):
        data = entry.data or b""
        text = data.decode("utf-16-le" if entry.value_type == 0x1F else "cp1252", "replace")
    return str(text).rstrip("\0") if text else None


def _prop_int(item: Any, tag: int) -> int | None:
    entry = _entry(item, tag)
    if entry is None:
        return None
    try:
        return int(entry.get_data_as_integer())
    except (OSError, RuntimeError, ValueError, TypeError):
        return None


def _attr(item: Any, name: str, tag: int | None = None) -> Any:
    """A pypff attribute; when libpff cannot convert it, the raw property `tag` as text."""
    try:
        return getattr(item, name)
    except (OSError, RuntimeError, ValueError):
        return _prop_text(item, tag) if tag is not None else None


def _body(item: Any, name: str, tag: int) -> bytes | None:
    """A body as pypff gives it (text bodies in UTF-8), or else the raw property.

    Never None for a body that exists: a body libpff cannot convert is taken raw
    (UTF-16 text re-encoded to UTF-8, other types as stored).
    """
    try:
        value = getattr(item, name)
    except (OSError, RuntimeError, ValueError):
        entry = _entry(item, tag)
        if entry is None or entry.data is None:
            raise
        data = bytes(entry.data)
        if entry.value_type == 0x1F:
            return data.decode("utf-16-le", "replace").rstrip("\0").encode("utf-8")
        return data.rstrip(b"\0") if entry.value_type == 0x1E else data
    return bytes(value) if value else None


# -- the MIME builder


@dataclass(frozen=True)
class _Part:
    headers: list[str]
    body: bytes

    def encode(self) -> bytes:
        return _header_bytes(self.headers) + b"\r\n" + self.body


def build_pst_message(message: Any) -> bytes:
    """The message as RFC 822 bytes, the same every time for the same message.

    Headers: the transport headers when the item has them (their Content-Type,
    MIME-Version and Content-Transfer-Encoding fields dropped; a Bcc field added
    from the recipient table when the headers have none), otherwise From, To,
    Cc, Bcc, Subject, Date, Message-ID, In-Reply-To and References from the
    item's properties. Body: text/plain (UTF-8) and text/html in a
    multipart/alternative; the RTF body only when there is neither; attachments
    after it in a multipart/mixed, each base64 with its name. Every body part is
    base64 (its bytes round-trip exactly); boundaries are hashes of the content
    they enclose. Lines end in CRLF.
    """
    structure = _pst_body(message)
    headers = _pst_headers(message)
    if not any(h.lower().startswith("message-id:") for h in headers):
        digest = hashlib.sha256(_header_bytes(headers) + structure.encode()).hexdigest()
        headers.append(f"Message-ID: <{digest[:40]}@pst-import.invalid>")
    return _header_bytes([*headers, "MIME-Version: 1.0", *structure.headers]) + (
        b"\r\n" + structure.body
    )


def _pst_body(message: Any) -> _Part:
    texts: list[_Part] = []
    plain = _body(message, "plain_text_body", PR_BODY)
    html = _body(message, "html_body", PR_HTML)
    codepage = _prop_int(message, PR_INTERNET_CPID)
    if plain:
        texts.append(_leaf("text/plain", plain, _charset(plain, 65001)))
    if html:
        texts.append(_leaf("text/html", html, _charset(html, codepage)))
    if not texts:
        rtf = message.rtf_body  # decompressed by libpff; a damaged one raises
        if rtf:
            texts.append(_leaf("text/rtf", bytes(rtf), None))
    if not texts:
        texts.append(_leaf("text/plain", b"", "us-ascii"))
    body = texts[0] if len(texts) == 1 else _multipart("alternative", texts)
    attachments = [_pst_attachment(message, i) for i in range(message.number_of_attachments)]
    return _multipart("mixed", [body, *attachments]) if attachments else body


def _pst_attachment(message: Any, index: int) -> _Part:
    attachment = message.get_attachment(index)
    name = (
        _attr(attachment, "long_filename")
        or _prop_text(attachment, PR_ATTACH_LONG_FILENAME)
        or _prop_text(attachment, PR_ATTACH_FILENAME)
        or _prop_text(attachment, PR_DISPLAY_NAME)
        or f"attachment-{index + 1}"
    )
    name = _single_line(str(name))
    content_id = _prop_text(attachment, PR_ATTACH_CONTENT_ID)
    extra = [f"Content-ID: <{_single_line(content_id).strip('<> ')}>"] if content_id else []
    disposition = f"Content-Disposition: attachment{_param('filename', name)}"
    method = _prop_int(attachment, PR_ATTACH_METHOD)
    if method == ATTACH_EMBEDDED_MSG:
        # An attached Outlook item: its "data" is a reference, never the item's bytes.
        embedded = _embedded_message(attachment)
        if embedded is None:
            return _unextracted(message, index, name, "an attached Outlook item", disposition)
        encoding = "7bit" if embedded.isascii() else "8bit"
        return _Part(
            [
                f"Content-Type: message/rfc822{_param('name', name)}",
                f"Content-Transfer-Encoding: {encoding}",
                disposition,
                *extra,
            ],
            embedded,
        )
    data = _attachment_data(attachment, name)
    if data is None:
        if method in ATTACH_BY_REFERENCE:
            return _unextracted(message, index, name, "a link to a file", disposition)
        raise ProviderDataError(f"pst_import: the data of attachment {name!r} cannot be read")
    mime = (_prop_text(attachment, PR_ATTACH_MIME_TAG) or "").strip().lower()
    # message/* and multipart/* may not be base64-encoded: their bytes go as a file.
    if not _MIME_TYPE.fullmatch(mime) or mime.startswith(("message/", "multipart/")):
        mime = "application/octet-stream"
    return _Part(
        [
            f"Content-Type: {mime}{_param('name', name)}",
            "Content-Transfer-Encoding: base64",
            disposition,
            *extra,
        ],
        _base64(data),
    )


def _attachment_data(attachment: Any, name: str) -> bytes | None:
    """The attachment's bytes; None when libpff has no data for it."""
    try:
        size = int(attachment.size or 0)
    except (OSError, RuntimeError, ValueError):
        return None
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:  # read_buffer takes a C int: read big attachments in pieces
        piece = attachment.read_buffer(min(remaining, 64 * 1024 * 1024))
        if not piece:
            break
        chunks.append(bytes(piece))
        remaining -= len(piece)
    data = b"".join(chunks)
    if len(data) != size:
        raise ProviderDataError(
            f"pst_import: attachment {name!r} is {size} bytes, only {len(data)} could be read"
        )
    return data


def _unextracted(message: Any, index: int, name: str, what: str, disposition: str) -> _Part:
    """A visible stand-in for an attachment whose content libpff-python cannot give.

    The message is archived (never dropped); the part says what is missing, and a
    warning is logged.
    """
    note = (
        f"This attachment ({what}) could not be extracted from the PST file: "
        "libpff-python gives no access to its content.\r\n"
    )
    logger.warning(
        "pst_import: message %s, attachment %d (%r): %s not extracted",
        _attr(message, "identifier"),
        index + 1,
        name,
        what,
    )
    return _Part(
        [
            f'Content-Type: text/plain; charset="utf-8"{_param("name", name)}',
            "Content-Transfer-Encoding: base64",
            disposition,
            f"X-Ingestion-Unextracted: {what}",
        ],
        _base64(note.encode()),
    )


def _embedded_message(attachment: Any) -> bytes | None:
    """An attached Outlook item rebuilt, if pypff exposes it as a sub-item."""
    try:
        if not attachment.number_of_sub_items:
            return None
        item = attachment.get_sub_item(0)
    except (OSError, RuntimeError, ValueError):
        return None
    if not hasattr(item, "number_of_attachments"):
        return None
    return build_pst_message(item)


def _leaf(mime: str, data: bytes, charset: str | None) -> _Part:
    """A base64 part: every byte of `data` comes back from the parser as is."""
    params = f'; charset="{charset}"' if charset else ""
    return _Part(
        [f"Content-Type: {mime}{params}", "Content-Transfer-Encoding: base64"], _base64(data)
    )


def _multipart(subtype: str, parts: list[_Part]) -> _Part:
    encoded = [part.encode() for part in parts]
    digest = hashlib.sha256()
    for chunk in encoded:
        digest.update(len(chunk).to_bytes(8, "big"))
        digest.update(chunk)
    # "=_" never occurs in base64 text, and our part headers never start with "--".
    boundary = f"=_{subtype}_{digest.hexdigest()[:32]}"
    delimiter = b"--" + boundary.encode("ascii")
    body = b"".join(delimiter + b"\r\n" + chunk + b"\r\n" for chunk in encoded)
    return _Part(
        [f'Content-Type: multipart/{subtype}; boundary="{boundary}"'],
        body + delimiter + b"--\r\n",
    )


def _base64(data: bytes) -> bytes:
    return b"\r\n".join(base64.b64encode(data[i : i + 57]) for i in range(0, len(data), 57))


def _charset(data: bytes, codepage: int | None) -> str:
    if data.isascii():
        return "us-ascii"
    if codepage and codepage != 65001:
        return CODEPAGE_CHARSETS.get(codepage, f"cp{codepage}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown-8bit"
    return "utf-8"


def _param(name: str, value: str) -> str:
    """`; name="value"`, or RFC 2231 continuations for text that cannot be quoted."""
    quotable = value.isascii() and value.isprintable() and not {'"', "\\"} & set(value)
    if quotable and len(value) <= 900:
        return f'; {name}="{value}"'
    encoded = email.utils.encode_rfc2231(value, "utf-8")
    # Split between %XX escapes, into lines of at most ~70 characters.
    pieces: list[str] = []
    current = ""
    for token in re.findall(r"%[0-9A-Fa-f]{2}|.", encoded, re.DOTALL):
        if len(current) + len(token) > 60:
            pieces.append(current)
            current = ""
        current += token
    pieces.append(current)
    if len(pieces) == 1:
        return f"; {name}*={pieces[0]}"
    return "".join(f";\r\n {name}*{i}*={piece}" for i, piece in enumerate(pieces))


def _single_line(text: str) -> str:
    return " ".join(_LINE_BREAK.split(text)).replace("\0", "")


def _header_bytes(lines: list[str]) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode("utf-8", "backslashreplace")


def _pst_headers(message: Any) -> list[str]:
    recipients = _recipients(message)
    transport = _attr(message, "transport_headers", PR_TRANSPORT_HEADERS)
    if transport and str(transport).strip():
        headers = _transport_headers(str(transport))
        bcc = recipients.get(3)
        if bcc and not any(h.lower().startswith("bcc:") for h in headers):
            headers.append(_address_header("Bcc", bcc))
        return headers
    headers = []
    sender = _sender(message)
    if sender:
        headers.append(_address_header("From", [sender]))
    for kind, field in ((1, "To"), (2, "Cc"), (3, "Bcc")):
        if recipients.get(kind):
            headers.append(_address_header(field, recipients[kind]))
    subject = _attr(message, "subject", PR_SUBJECT)
    if subject:
        headers.append(_text_header("Subject", str(subject)))
    when = (
        _attr(message, "client_submit_time")
        or _attr(message, "delivery_time")
        or _attr(message, "creation_time")
    )
    if isinstance(when, datetime):
        moment = when.replace(tzinfo=UTC) if when.tzinfo is None else when
        headers.append(f"Date: {email.utils.format_datetime(moment)}")
    for tag, field in (
        (PR_INTERNET_MESSAGE_ID, "Message-ID"),
        (PR_IN_REPLY_TO, "In-Reply-To"),
        (PR_REFERENCES, "References"),
    ):
        value = _prop_text(message, tag)
        if value and value.strip():
            headers.append(f"{field}: {_single_line(value).strip()}")
    return headers


def _transport_headers(text: str) -> list[str]:
    """The header lines, without the MIME fields, each one a valid header line."""
    lines: list[str] = []
    dropping = False
    for line in _LINE_BREAK.split(text):
        if not line.strip():
            continue  # blank lines would end the header block
        line = line.replace("\0", "")
        if _HEADER_START.match(line):
            dropping = line.split(":", 1)[0].strip().lower() in MIME_FIELDS
        elif line[0] in " \t" and lines:
            pass  # a continuation line
        elif lines:
            line = " " + line  # not a header: keep it as a continuation
        else:
            line = "X-Unparsed-Header: " + line.lstrip()
            dropping = False
        if not dropping:
            lines.append(line)
    return lines


def _sender(message: Any) -> tuple[str, str] | None:
    for name_tag, smtp_tag, email_tag in (
        (PR_SENT_REPRESENTING_NAME, PR_SENT_REPRESENTING_SMTP, PR_SENT_REPRESENTING_EMAIL),
        (PR_SENDER_NAME, PR_SENDER_SMTP, PR_SENDER_EMAIL),
    ):
        address = _prop_text(message, smtp_tag) or _prop_text(message, email_tag) or ""
        name = _prop_text(message, name_tag) or ""
        if address or name:
            return name, address
    name = _attr(message, "sender_name")
    return (str(name), "") if name else None


def _recipients(message: Any) -> dict[int, list[tuple[str, str]]]:
    """Recipients by type (1 To, 2 Cc, 3 Bcc), in the table's order."""
    found: dict[int, list[tuple[str, str]]] = {}
    table = _attr(message, "recipients")
    if table is None:
        return found
    try:
        count = int(table.number_of_record_sets)
    except (OSError, RuntimeError, ValueError):
        return found
    for index in range(count):
        try:
            record = table.get_record_set(index)
        except (OSError, RuntimeError, ValueError):
            continue
        holder = _RecordHolder(record)
        kind = _prop_int(holder, PR_RECIPIENT_TYPE) or 1
        name = _prop_text(holder, PR_DISPLAY_NAME) or ""
        address = _prop_text(holder, PR_SMTP_ADDRESS) or _prop_text(holder, PR_EMAIL_ADDRESS) or ""
        if name or address:
            found.setdefault(kind & 0x0F, []).append((name, address))
    return found


class _RecordHolder:
    """Lets the property helpers read one record set of a table."""

    number_of_record_sets = 1

    def __init__(self, record: Any) -> None:
        self._record = record

    def get_record_set(self, index: int) -> Any:
        return self._record


def _address_header(field: str, people: list[tuple[str, str]]) -> str:
    rendered = []
    for name, address in people:
        name, address = _single_line(name).strip(), _single_line(address).strip()
        if address:
            rendered.append(email.utils.formataddr((name, address), charset="utf-8"))
        elif name.isascii():
            rendered.append(f'"{email.utils.quote(name)}"')
        else:
            rendered.append(_encode_words(name))
    return f"{field}: " + ",\r\n ".join(rendered)


def _text_header(field: str, value: str) -> str:
    value = _single_line(value)
    if value.isascii() and len(value) < 900:
        return f"{field}: {value}"
    return f"{field}: {_encode_words(value, field)}"


def _encode_words(value: str, field: str = "") -> str:
    if value.isascii() and len(value) < 900:
        return value
    return email.header.Header(value, "utf-8", header_name=field or None).encode("\r\n")
