"""eml_import: a .zip of .eml files or a folder of them, byte for byte, with folder paths,
exact resumption, and refusal of zip bombs; entries that climb out of the archive are
skipped and counted."""

from __future__ import annotations

import logging
import mailbox
import warnings
import zipfile
from pathlib import Path

import pytest

from ingestion_grpc.errors import InvalidArgument, ProviderDataError
from ingestion_grpc.providers.base import (
    Batch,
    FetchedMessage,
    JsonDict,
    Mailbox,
    ProviderEnvironment,
)
from ingestion_grpc.providers.eml import EmlImport
from tests.support.fetch_context import NO_CONTEXT

CORPORA = Path(__file__).resolve().parents[3].parent / "shared" / "corpora"
HAM = CORPORA / "spamassassin-easy-ham-1.mbox"
FOLDERS = ["", "Archive", "Archive/2002", "Archive/2002/Lists", "Inbox"]


@pytest.fixture(scope="module")
def ham() -> list[bytes]:
    assert HAM.is_file(), f"the test corpora are missing: expected them in {CORPORA}"
    box = mailbox.mbox(HAM, create=False)
    try:
        return [box.get_bytes(key) for key in box.iterkeys()]
    finally:
        box.close()


def entry_name(index: int) -> str:
    folder = FOLDERS[index % len(FOLDERS)]
    return f"{folder}/{index:04d}.eml" if folder else f"{index:04d}.eml"


def write_zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return path


def fetch_all(
    provider: EmlImport, cursor: JsonDict | None = None
) -> tuple[list[Batch], list[FetchedMessage]]:
    batches = list(provider.fetch(provider.list_mailboxes()[0], cursor, NO_CONTEXT))
    return batches, [m for b in batches for m in b.messages]


def eml(env: ProviderEnvironment, config: dict[str, str], **options: int) -> EmlImport:
    provider = EmlImport(EmlImport.validate_config(config), env, **options)
    provider.check_connection()
    return provider


def test_the_ham_messages_zipped_as_eml_come_back_byte_for_byte(
    env: ProviderEnvironment, import_root: Path, ham: list[bytes]
) -> None:
    entries = [(entry_name(i), raw) for i, raw in enumerate(ham)]
    # folders, a file that is not an .eml, in shuffled order: the import sorts
    extra = [("Archive/", b""), ("README.txt", b"not mail")]
    write_zip(import_root / "mail.zip", extra + entries[::-1])

    provider = eml(env, {"localFilePath": "mail.zip"})
    assert provider.continuous_sync is False
    assert provider.list_mailboxes() == [Mailbox("mail.zip", "mail.zip")]
    batches, messages = fetch_all(provider)

    assert len(messages) == 2500
    expected = sorted((entry_name(i), i) for i in range(2500))
    assert [m.provider_message_id for m in messages] == [name for name, _ in expected]
    for message, (name, index) in zip(messages, expected, strict=True):
        assert message.raw == ham[index]
        assert message.folder_paths[0] == name.rpartition("/")[0]
    assert {m.folder_paths[0] for m in messages} == set(FOLDERS)
    assert provider.skipped == 1  # README.txt; folders are not counted
    assert all(len(b.messages) <= 500 for b in batches)


def test_a_restart_from_any_batch_cursor_yields_exactly_the_rest(
    env: ProviderEnvironment, import_root: Path, ham: list[bytes]
) -> None:
    entries = [(entry_name(i), raw) for i, raw in enumerate(ham[:600])]
    write_zip(import_root / "mail.zip", [*entries, ("junk/notes.txt", b"x")])
    batches, everything = fetch_all(eml(env, {"localFilePath": "mail.zip"}, batch_messages=70))
    assert len(everything) == 600
    done = 0
    for batch in batches:
        done += len(batch.messages)
        fresh = EmlImport({"localFilePath": "mail.zip"}, env, batch_messages=70)
        _, rest = fetch_all(fresh, batch.cursor)
        assert [(m.provider_message_id, m.raw) for m in rest] == [
            (m.provider_message_id, m.raw) for m in everything[done:]
        ]
        assert fresh.skipped == 1


def test_entries_that_climb_out_of_the_archive_are_skipped_counted_and_logged(
    env: ProviderEnvironment, import_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_zip(
        import_root / "evil.zip",
        [
            ("../evil.eml", b"Subject: evil\r\n\r\n"),
            ("a/../../evil2.eml", b"Subject: evil\r\n\r\n"),
            ("/etc/abs.eml", b"Subject: abs\r\n\r\n"),
            ("C:/win.eml", b"Subject: win\r\n\r\n"),
            ("__MACOSX/._good.eml", b"\x00\x05\x16\x07"),
            ("empty.eml", b""),
            ("good.eml", b"Subject: good\r\n\r\nbody\r\n"),
        ],
    )
    provider = eml(env, {"localFilePath": "evil.zip"})
    with caplog.at_level(logging.WARNING):
        _, messages = fetch_all(provider)
    assert [(m.provider_message_id, m.folder_paths[0], m.raw) for m in messages] == [
        ("good.eml", "", b"Subject: good\r\n\r\nbody\r\n")
    ]
    assert provider.skipped == 6
    assert "../evil.eml" in provider.skipped_names
    assert "leads outside the archive" in caplog.text
    assert "../evil.eml" in caplog.text


def test_a_zip_bomb_entry_is_refused_before_anything_is_imported(
    env: ProviderEnvironment, import_root: Path
) -> None:
    bomb = b"\0" * (2 * 1024 * 1024)  # compresses about 1000:1
    write_zip(import_root / "bomb.zip", [("a.eml", b"Subject: a\r\n\r\n"), ("b.eml", bomb)])
    provider = eml(env, {"localFilePath": "bomb.zip"})
    with pytest.raises(ProviderDataError, match="zip bomb") as caught:
        next(iter(provider.fetch(Mailbox("bomb.zip", "bomb.zip"), None, NO_CONTEXT)))
    assert "b.eml" in str(caught.value)
    # under the ratio threshold (a small entry), the same ratio is fine
    small = eml(env, {"localFilePath": "bomb.zip"}, ratio_min_bytes=4 * 1024 * 1024)
    assert len(fetch_all(small)[1]) == 2


def test_an_entry_over_the_size_limit_is_refused(
    env: ProviderEnvironment, import_root: Path
) -> None:
    big = bytes(range(256)) * 400  # 100 KiB, incompressible enough
    write_zip(import_root / "big.zip", [("a.eml", b"Subject: a\r\n\r\n"), ("big.eml", big)])
    provider = eml(env, {"localFilePath": "big.zip"}, max_entry_bytes=50_000)
    with pytest.raises(ProviderDataError, match=r"big\.eml") as caught:
        fetch_all(provider)
    assert "limit of 50000" in str(caught.value)


def test_a_damaged_entry_is_a_data_error(env: ProviderEnvironment, import_root: Path) -> None:
    path = import_root / "bad.zip"
    data = b"Subject: x\r\n\r\n" + b"ABCDEFGH" * 100
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("x.eml", data)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"ABCDEFGH") + 3] ^= 0xFF  # the CRC no longer matches
    path.write_bytes(bytes(raw))
    provider = eml(env, {"localFilePath": "bad.zip"})
    with pytest.raises(ProviderDataError, match=r"x\.eml"):
        fetch_all(provider)


def test_duplicate_entry_names_are_both_imported_with_distinct_ids(
    env: ProviderEnvironment, import_root: Path
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        write_zip(import_root / "dup.zip", [("m.eml", b"Subject: 1\r\n\r\n"), ("m.eml", b"S: 2")])
    _, messages = fetch_all(eml(env, {"localFilePath": "dup.zip"}))
    assert [(m.provider_message_id, m.raw) for m in messages] == [
        ("m.eml", b"Subject: 1\r\n\r\n"),
        ("m.eml#2", b"S: 2"),
    ]


def test_a_folder_of_eml_files_is_walked_in_sorted_order(
    env: ProviderEnvironment, import_root: Path, tmp_path: Path, ham: list[bytes]
) -> None:
    top = import_root / "export"
    for i in range(30):
        path = top / entry_name(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(ham[i])
    (top / "notes.txt").write_text("not mail")
    (top / "Inbox" / "empty.eml").write_bytes(b"")
    outside = tmp_path / "secret.eml"
    outside.write_bytes(b"Subject: secret\r\n\r\n")
    (top / "Inbox" / "escape.eml").symlink_to(outside)
    (top / "linked-folder").symlink_to(top / "Archive")
    (top / "Inbox" / "inside.eml").symlink_to(top / "0000.eml")

    provider = eml(env, {"localFilePath": "export"}, batch_messages=7)
    assert provider.list_mailboxes() == [Mailbox("export", "export")]
    batches, messages = fetch_all(provider)
    expected = sorted([*(entry_name(i) for i in range(30)), "Inbox/inside.eml"])
    assert [m.provider_message_id for m in messages] == expected
    by_name = {entry_name(i): ham[i] for i in range(30)} | {"Inbox/inside.eml": ham[0]}
    for message in messages:
        assert message.raw == by_name[message.provider_message_id]
        assert message.folder_paths[0] == message.provider_message_id.rpartition("/")[0]
    # notes.txt, empty.eml, the escaping link, the linked folder
    assert provider.skipped == 4

    done = 0
    for batch in batches:
        done += len(batch.messages)
        fresh = EmlImport({"localFilePath": "export"}, env, batch_messages=7)
        _, rest = fetch_all(fresh, batch.cursor)
        assert [m.provider_message_id for m in rest] == expected[done:]

    # a file added before the resume point shifts the listing: refused, not skipped
    (top / "0000a.eml").write_bytes(b"Subject: new\r\n\r\n")
    with pytest.raises(ProviderDataError, match="changed"):
        fetch_all(EmlImport({"localFilePath": "export"}, env), batches[1].cursor)


def test_a_file_that_is_neither_a_zip_nor_a_folder_is_refused(
    env: ProviderEnvironment, import_root: Path
) -> None:
    (import_root / "x.zip").write_bytes(b"Subject: not a zip\r\n\r\n")
    with pytest.raises(InvalidArgument) as caught:
        EmlImport({"localFilePath": "x.zip"}, env).check_connection()
    assert caught.value.field == "providerConfig.localFilePath"
    assert "is not a zip file" in caught.value.description
    with pytest.raises(InvalidArgument) as caught:
        EmlImport({"localFilePath": "missing.zip"}, env).check_connection()
    assert caught.value.description == "does not exist"


def test_a_zip_escaping_the_root_through_a_symlink_is_refused(
    env: ProviderEnvironment, import_root: Path, tmp_path: Path
) -> None:
    write_zip(tmp_path / "outside.zip", [("a.eml", b"Subject: a\r\n\r\n")])
    (import_root / "in.zip").symlink_to(tmp_path / "outside.zip")
    with pytest.raises(InvalidArgument) as caught:
        EmlImport({"localFilePath": "in.zip"}, env).check_connection()
    assert "symbolic link" in caught.value.description
