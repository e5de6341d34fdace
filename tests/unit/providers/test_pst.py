"""pst_import: the Enron PST rebuilt as RFC 822, deterministically, with every attachment
byte for byte; exact resumption; damaged files are data errors, never a crash."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
from collections import Counter
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pypff
import pytest

from ingestion_grpc.errors import InvalidArgument, ProviderDataError
from ingestion_grpc.providers.base import (
    Batch,
    FetchedMessage,
    JsonDict,
    Mailbox,
    ProviderEnvironment,
)
from ingestion_grpc.providers.pst import PstImport
from ingestion_grpc.providers.pst_mime import build_pst_message
from tests.support.fetch_context import NO_CONTEXT

CORPORA = Path(__file__).resolve().parents[3].parent / "shared" / "corpora"
PST = CORPORA / "enron.pst"
TOP = "lokay-m/MLOKAY (Non-Privileged)"
MIME_FIELDS = {"content-type", "mime-version", "content-transfer-encoding"}
FOLDER_COUNTS = {
    TOP: 1,
    f"{TOP}/TW-Commercial Group": 14,
    f"{TOP}/Systems": 7,
    f"{TOP}/Sent Items": 2,
    f"{TOP}/Personal": 47,
}


def fetch_all(
    provider: PstImport, cursor: JsonDict | None = None
) -> tuple[list[Batch], list[FetchedMessage]]:
    batches = list(provider.fetch(provider.list_mailboxes()[0], cursor, NO_CONTEXT))
    return batches, [m for b in batches for m in b.messages]


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def attachments_of(message: EmailMessage) -> list[tuple[str | None, bytes]]:
    found = []
    for part in message.walk():
        if part.get_content_disposition() == "attachment":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found.append((part.get_filename(), payload))
    return found


def pypff_messages() -> list[tuple[int, Any]]:
    """(identifier, message) of every message, read with pypff directly."""
    pst = pypff.file()
    pst.open(str(PST))
    found: list[tuple[int, Any]] = []

    def walk(folder: Any) -> None:
        for i in range(folder.number_of_sub_messages):
            message = folder.get_sub_message(i)
            found.append((message.identifier, message))
        for i in range(folder.number_of_sub_folders):
            walk(folder.get_sub_folder(i))

    walk(pst.get_root_folder())
    return found


def test_enron_pst_gives_71_messages_in_5_folders(corpora: ProviderEnvironment) -> None:
    provider = PstImport(PstImport.validate_config({"localFilePath": PST.name}), corpora)
    provider.check_connection()
    assert provider.continuous_sync is False
    assert provider.list_mailboxes() == [Mailbox("enron.pst", "enron.pst")]
    batches, messages = fetch_all(provider)

    assert len(messages) == 71
    assert Counter(m.folder_paths[0] for m in messages) == FOLDER_COUNTS
    ids = [m.provider_message_id for m in messages]
    assert len(set(ids)) == 71
    for message in messages:
        folder, _, identifier = message.provider_message_id.rpartition("/")
        assert folder == message.folder_paths[0]
        assert identifier.isdigit()
    json.dumps([b.cursor for b in batches])
    assert batches[-1].cursor["count"] == 71


def test_every_attachment_round_trips_with_its_name_and_bytes(corpora: ProviderEnvironment) -> None:
    _, messages = fetch_all(PstImport({"localFilePath": PST.name}, corpora))
    direct = dict(pypff_messages())
    total = 0
    for fetched in messages:
        source = direct[int(fetched.provider_message_id.rpartition("/")[2])]
        expected = []
        for i in range(source.number_of_attachments):
            attachment = source.get_attachment(i)
            expected.append((attachment.long_filename, attachment.read_buffer(attachment.size)))
        parsed = parse(fetched.raw)
        assert attachments_of(parsed) == expected
        total += len(expected)

        # the plain body comes back exactly, and the transport headers are kept
        body = parsed.get_body(("plain",))
        assert body is not None
        assert body.get_payload(decode=True) == source.plain_text_body
        assert parsed["Message-ID"]
        head = fetched.raw.split(b"\r\n\r\n", 1)[0].decode()
        for line in source.transport_headers.splitlines():
            if line.strip() and line.split(":")[0].lower() not in MIME_FIELDS:
                assert line in head
        assert parsed.get_content_type() in ("text/plain", "multipart/mixed")
        assert parsed["MIME-Version"] == "1.0"
        assert len(parsed.get_all("Content-Type") or []) == 1
    assert total == 70


def test_two_imports_produce_identical_bytes(corpora: ProviderEnvironment) -> None:
    first = fetch_all(PstImport({"localFilePath": PST.name}, corpora))[1]
    second = fetch_all(PstImport({"localFilePath": PST.name}, corpora))[1]
    assert [(m.provider_message_id, m.folder_paths[0], m.raw) for m in first] == [
        (m.provider_message_id, m.folder_paths[0], m.raw) for m in second
    ]


def test_a_restart_from_any_batch_cursor_yields_exactly_the_rest(
    corpora: ProviderEnvironment,
) -> None:
    batches, everything = fetch_all(
        PstImport({"localFilePath": PST.name}, corpora, batch_messages=6)
    )
    assert len(batches) == 12
    done = 0
    for batch in batches:
        done += len(batch.messages)
        fresh = PstImport({"localFilePath": PST.name}, corpora, batch_messages=6)
        stored = json.loads(json.dumps(batch.cursor))
        stored["count"] = float(stored["count"])  # numbers come back as floats from Struct
        _, rest = fetch_all(fresh, stored)
        assert [m.provider_message_id for m in rest] == [
            m.provider_message_id for m in everything[done:]
        ]
        assert [m.raw for m in rest] == [m.raw for m in everything[done:]]


def test_batches_are_bounded_by_bytes(corpora: ProviderEnvironment) -> None:
    batches, messages = fetch_all(
        PstImport({"localFilePath": PST.name}, corpora, batch_bytes=1_000_000)
    )
    assert len(messages) == 71
    for batch in batches:
        assert sum(len(m.raw) for m in batch.messages) <= 1_000_000 or len(batch.messages) == 1


def test_a_cursor_that_does_not_fit_the_file_is_refused(corpora: ProviderEnvironment) -> None:
    batches, _ = fetch_all(PstImport({"localFilePath": PST.name}, corpora, batch_messages=10))
    cursor = dict(batches[2].cursor)
    cursor["last"] = "lokay-m/elsewhere/1"
    with pytest.raises(ProviderDataError, match="changed"):
        fetch_all(PstImport({"localFilePath": PST.name}, corpora), cursor)
    with pytest.raises(ProviderDataError, match="changed"):
        fetch_all(
            PstImport({"localFilePath": PST.name}, corpora), {**batches[0].cursor, "size": 12}
        )


def test_a_truncated_pst_is_refused_without_crashing(
    env: ProviderEnvironment, import_root: Path
) -> None:
    with PST.open("rb") as source:
        (import_root / "truncated.pst").write_bytes(source.read(1024 * 1024))
    provider = PstImport({"localFilePath": "truncated.pst"}, env)
    with pytest.raises(InvalidArgument) as caught:
        provider.check_connection()
    assert caught.value.field == "providerConfig.localFilePath"
    assert "truncated" in caught.value.description
    with pytest.raises((InvalidArgument, ProviderDataError)):
        fetch_all(provider)
    # past the header check, libpff's own failure is a data error too
    with pytest.raises(ProviderDataError, match="damaged or truncated"):
        list(provider.read(provider.source(), None))


def test_a_damaged_pst_is_a_data_error_or_reads_but_never_crashes(
    env: ProviderEnvironment, import_root: Path
) -> None:
    damaged = bytearray(PST.read_bytes())
    # overwrite the index nodes libpff reads at open (they sit near the end)
    damaged[-70_000:-4_096] = b"\xa5" * (70_000 - 4_096)
    (import_root / "damaged.pst").write_bytes(bytes(damaged))
    provider = PstImport({"localFilePath": "damaged.pst"}, env)
    provider.check_connection()  # the header is intact
    with pytest.raises(ProviderDataError, match="damaged or truncated"):
        fetch_all(provider)


def test_a_file_that_is_not_a_pst_is_refused(env: ProviderEnvironment, import_root: Path) -> None:
    (import_root / "x.pst").write_bytes(b"From a\n\nthis is an mbox\n")
    with pytest.raises(InvalidArgument) as caught:
        PstImport({"localFilePath": "x.pst"}, env).check_connection()
    assert caught.value.description == "is not a PST or OST file"


def test_a_pst_outside_the_import_root_is_refused(
    env: ProviderEnvironment, import_root: Path, tmp_path: Path
) -> None:
    shutil.copy(PST, tmp_path / "enron.pst")
    (import_root / "link.pst").symlink_to(tmp_path / "enron.pst")
    for path in (str(tmp_path / "enron.pst"), str(PST), "link.pst"):
        with pytest.raises(InvalidArgument) as caught:
            PstImport(PstImport.validate_config({"localFilePath": path}), env).check_connection()
        assert caught.value.field == "providerConfig.localFilePath"


# --- the RFC 822 builder, on an item without transport headers -------------------------


class Entry:
    def __init__(self, value: Any) -> None:
        self.value = value
        self.value_type = 0x1F if isinstance(value, str) else 0x3
        self.data = value.encode("utf-16-le") if isinstance(value, str) else b""

    def get_data_as_string(self) -> str:
        return str(self.value)

    def get_data_as_integer(self) -> int:
        return int(self.value)


class Record:
    def __init__(self, properties: dict[int, Any]) -> None:
        self.properties = properties

    def get_entry_by_type(self, tag: int) -> Entry | None:
        return Entry(self.properties[tag]) if tag in self.properties else None


class Item:
    """Just enough of a pypff item: properties in one record set."""

    def __init__(self, properties: dict[int, Any], **attributes: Any) -> None:
        self.number_of_record_sets = 1
        self.record = Record(properties)
        self.__dict__.update(attributes)

    def get_record_set(self, index: int) -> Record:
        return self.record


class Table:
    def __init__(self, records: list[dict[int, Any]]) -> None:
        self.records = [Record(r) for r in records]
        self.number_of_record_sets = len(records)

    def get_record_set(self, index: int) -> Record:
        return self.records[index]


class Attachment(Item):
    def __init__(self, name: str, data: bytes, mime: str | None = None) -> None:
        properties = {0x3705: 1, **({0x370E: mime} if mime else {})}
        super().__init__(properties, long_filename=name, size=len(data))
        self.data = data

    def read_buffer(self, size: int) -> bytes:
        return bytes(self.data[:size])


NAMES = [
    "report.pdf",
    "Überweisung März.xlsx",
    'quote "this".txt',
    "back\\slash.txt",
    "日本語のファイル名" * 12 + ".doc",
    "x" * 200 + ".bin",
    "forwarded.eml",
]


def synthetic_message(**changes: Any) -> Item:
    attachments = [
        Attachment(name, bytes(range(256)) * (i + 1), mime)
        for i, (name, mime) in enumerate(
            zip(
                NAMES,
                ["application/pdf", None, "text/plain", "bad type", None, None, "message/rfc822"],
                strict=True,
            )
        )
    ]
    fields: dict[str, Any] = {
        "identifier": 2097188,
        "transport_headers": None,
        "plain_text_body": "Grüße\r\nline two\r\n".encode(),
        "html_body": b"<p>Gr\xfc\xdfe</p>",
        "rtf_body": None,
        "subject": "Réunion: budget\nsecond line",
        "sender_name": "Lokay, Michelle",
        "client_submit_time": datetime(2001, 10, 26, 14, 5, 9),
        "delivery_time": None,
        "creation_time": None,
        "recipients": Table(
            [
                {0x3001: "Ann Smith", 0x39FE: "ann@example.com", 0x0C15: 1},
                {0x3001: "Zoë, Bob", 0x3003: "bob@example.com", 0x0C15: 1},
                {0x3001: "Carol", 0x3003: "carol@example.com", 0x0C15: 2},
                {0x3001: "Hidden", 0x3003: "hidden@example.com", 0x0C15: 3},
            ]
        ),
        "number_of_attachments": len(attachments),
        "get_attachment": attachments.__getitem__,
    }
    fields.update(changes)
    properties = {
        0x0042: "Lokay, Michelle",
        0x0065: "michelle.lokay@enron.com",
        0x3FDE: 28591,  # iso-8859-1: the charset of the HTML body
        0x1042: "<parent@example.com>",
    }
    return Item(properties, **fields)


def test_an_item_without_transport_headers_gets_synthesised_headers() -> None:
    raw = build_pst_message(synthetic_message())
    assert raw == build_pst_message(synthetic_message())  # deterministic
    for line in raw.split(b"\r\n"):
        assert len(line) <= 998
    assert b"\n" not in raw.replace(b"\r\n", b"")
    parsed = parse(raw)
    assert parsed["From"].addresses[0].addr_spec == "michelle.lokay@enron.com"
    assert parsed["From"].addresses[0].display_name == "Lokay, Michelle"
    assert [a.addr_spec for a in parsed["To"].addresses] == ["ann@example.com", "bob@example.com"]
    assert parsed["To"].addresses[1].display_name == "Zoë, Bob"
    assert [a.addr_spec for a in parsed["Cc"].addresses] == ["carol@example.com"]
    assert [a.addr_spec for a in parsed["Bcc"].addresses] == ["hidden@example.com"]
    assert parsed["Subject"] == "Réunion: budget second line"
    assert parsed["Date"] == "Fri, 26 Oct 2001 14:05:09 +0000"
    assert parsed["In-Reply-To"] == "<parent@example.com>"
    assert parsed["Message-ID"].endswith("@pst-import.invalid>")
    assert not parsed.defects

    plain = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert plain is not None and html is not None
    assert plain.get_content() == "Grüße\r\nline two\r\n"
    assert html.get_payload(decode=True) == b"<p>Gr\xfc\xdfe</p>"
    assert html.get_content() == "<p>Grüße</p>"
    assert html.get_content_charset() == "iso-8859-1"

    found = attachments_of(parsed)
    assert [name for name, _ in found] == NAMES
    for i, (_, data) in enumerate(found):
        assert data == bytes(range(256)) * (i + 1)
    types = [p.get_content_type() for p in parsed.walk() if p.get_filename()]
    assert types[0] == "application/pdf"
    assert types[3] == "application/octet-stream"  # an invalid MIME tag
    assert types[6] == "application/octet-stream"  # message/* cannot be base64


def test_transport_headers_are_kept_and_their_mime_fields_replaced() -> None:
    headers = (
        "Received: from a\r\n\tby b\r\nContent-Type: multipart/mixed;\r\n"
        '\tboundary="old"\r\nMIME-Version: 1.0\r\nSubject: Hi\r\nnot a header line\r\n'
        "Content-Transfer-Encoding: 7bit\r\nFrom: a@example.com\r\n\r\n"
    )
    raw = build_pst_message(
        synthetic_message(transport_headers=headers, html_body=None, number_of_attachments=0)
    )
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("Received: from a\r\n\tby b\r\nSubject: Hi\r\n not a header line\r\n")
    assert "old" not in head
    assert head.count("Content-Type:") == 1
    assert head.count("MIME-Version:") == 1
    assert "Bcc: Hidden <hidden@example.com>" in head
    parsed = parse(raw)
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content() == "Grüße\r\nline two\r\n"
    assert parsed["From"] == "a@example.com"


class PieceByPiece(Attachment):
    """An attachment whose reads return at most 1,000 bytes at a time."""

    def __init__(self, name: str, data: bytes) -> None:
        super().__init__(name, data)
        self.offset = 0

    def read_buffer(self, size: int) -> bytes:
        piece = self.data[self.offset : self.offset + min(size, 1000)]
        self.offset += len(piece)
        return bytes(piece)


class EmbeddedItem(Attachment):
    """An attached Outlook item (method 5), which pypff cannot open."""

    def __init__(self, name: str) -> None:
        super().__init__(name, b"")
        self.record = Record({0x3705: 5})
        self.number_of_sub_items = 0

    @property
    def size(self) -> int:
        raise OSError("pypff_attachment_get_size: failed to retrieve data size.")

    @size.setter
    def size(self, value: int) -> None:
        pass


def test_attachments_are_read_in_pieces_and_unreadable_items_are_marked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = bytes(range(256)) * 40
    items = [PieceByPiece("big.bin", data), EmbeddedItem("Fwd: minutes")]
    raw = build_pst_message(
        synthetic_message(number_of_attachments=2, get_attachment=items.__getitem__)
    )
    parts = [p for p in parse(raw).walk() if p.get_content_disposition() == "attachment"]
    assert [p.get_filename() for p in parts] == ["big.bin", "Fwd: minutes"]
    assert parts[0].get_payload(decode=True) == data
    # the message is archived; the missing content is visible in it and in the log
    assert parts[1]["X-Ingestion-Unextracted"] == "an attached Outlook item"
    assert "could not be extracted" in parts[1].get_content()
    assert "not extracted" in caplog.text


def test_an_attachment_whose_data_cannot_be_read_is_a_data_error() -> None:
    broken = EmbeddedItem("report.doc")
    broken.record = Record({0x3705: 1})  # by value: its data must be there
    with pytest.raises(ProviderDataError, match=r"report\.doc"):
        build_pst_message(
            synthetic_message(number_of_attachments=1, get_attachment=[broken].__getitem__)
        )
