"""mbox_import: byte-for-byte equality with CPython's mailbox module, exact resumption
from every cursor, and the path rules shared by every file import."""

from __future__ import annotations

import contextlib
import json
import logging
import mailbox
import os
import random
import time
from collections.abc import Generator
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
from ingestion_grpc.providers.files import MAX_BATCH_BYTES, MAX_BATCH_MESSAGES
from ingestion_grpc.providers.mbox import MboxImport
from ingestion_grpc.providers.pst import PstImport
from ingestion_grpc.providers.registry import provider_class
from tests.support.fetch_context import NO_CONTEXT, NO_ENVIRONMENT

CORPORA = Path(__file__).resolve().parents[3].parent / "shared" / "corpora"
HAM = CORPORA / "spamassassin-easy-ham-1.mbox"
SPAM = CORPORA / "spamassassin-spam-1.mbox"


def cpython_messages(path: Path) -> list[bytes]:
    box = mailbox.mbox(path, create=False)
    try:
        return [box.get_bytes(key) for key in box.iterkeys()]
    finally:
        box.close()


def fetch_all(
    provider: MboxImport, cursor: JsonDict | None = None
) -> tuple[list[Batch], list[FetchedMessage]]:
    batches = list(provider.fetch(provider.list_mailboxes()[0], cursor, NO_CONTEXT))
    return batches, [m for b in batches for m in b.messages]


def through_storage(cursor: JsonDict) -> JsonDict:
    """A cursor as it comes back from JSON storage and google.protobuf.Struct (floats)."""
    restored: JsonDict = json.loads(json.dumps(cursor))
    return {k: float(v) if isinstance(v, int) else v for k, v in restored.items()}


def mbox_in(
    env: ProviderEnvironment, data: bytes, name: str = "test.mbox", **options: int
) -> MboxImport:
    (env.import_root / name).write_bytes(data)
    provider = MboxImport(MboxImport.validate_config({"localFilePath": name}), env, **options)
    provider.check_connection()
    return provider


# --- the corpora -------------------------------------------------------------------------


def test_the_ham_mbox_is_archived_byte_for_byte(corpora: ProviderEnvironment) -> None:
    provider = MboxImport(MboxImport.validate_config({"localFilePath": HAM.name}), corpora)
    provider.check_connection()
    assert provider.continuous_sync is False
    assert provider.list_mailboxes() == [Mailbox(HAM.name, HAM.name)]

    started = time.perf_counter()
    batches, messages = fetch_all(provider)
    elapsed = time.perf_counter() - started
    size = HAM.stat().st_size
    print(  # shown with pytest -s
        f"ham mbox: {len(messages)} messages in {elapsed:.3f}s = "
        f"{len(messages) / elapsed:.0f} messages/s, {size / elapsed / 1e6:.0f} MB/s"
    )

    expected = cpython_messages(HAM)
    assert len(expected) == 2500
    assert len(messages) == 2500
    for got, want in zip(messages, expected, strict=True):
        assert got.raw == want
    assert {m.folder_paths[0] for m in messages} == {HAM.name}

    # ids are the offsets of the From lines: stable, unique, increasing
    offsets = [int(m.provider_message_id) for m in messages]
    assert offsets == sorted(set(offsets))
    with HAM.open("rb") as handle:
        for offset in offsets[:50] + offsets[-50:]:
            handle.seek(offset)
            assert handle.read(5) == b"From "

    for batch in batches:
        assert 0 < len(batch.messages) <= MAX_BATCH_MESSAGES
        assert sum(len(m.raw) for m in batch.messages) <= MAX_BATCH_BYTES
        json.dumps(batch.cursor)  # JSON-serialisable
    assert batches[-1].cursor == {"offset": size, "count": 2500, "size": size}


def test_the_spam_mbox_has_500_messages_byte_for_byte(corpora: ProviderEnvironment) -> None:
    provider = MboxImport({"localFilePath": str(SPAM)}, corpora)  # an absolute path inside the root
    _, messages = fetch_all(provider)
    assert [m.raw for m in messages] == cpython_messages(SPAM)
    assert len(messages) == 500


def test_a_restart_from_any_batch_cursor_yields_exactly_the_rest(
    corpora: ProviderEnvironment,
) -> None:
    provider = MboxImport({"localFilePath": HAM.name}, corpora, batch_messages=97)
    batches, everything = fetch_all(provider)
    assert len(batches) == 26
    done = 0
    for batch in batches:
        done += len(batch.messages)
        # a new process, after a crash: a fresh provider, the cursor from storage
        fresh = MboxImport({"localFilePath": HAM.name}, corpora, batch_messages=97)
        _, rest = fetch_all(fresh, through_storage(batch.cursor))
        assert [m.raw for m in rest] == [m.raw for m in everything[done:]]
        assert [m.provider_message_id for m in rest] == [
            m.provider_message_id for m in everything[done:]
        ]


def test_batches_are_bounded_by_bytes(corpora: ProviderEnvironment) -> None:
    provider = MboxImport({"localFilePath": HAM.name}, corpora, batch_bytes=100_000)
    batches, messages = fetch_all(provider)
    assert len(messages) == 2500
    for batch in batches:
        size = sum(len(m.raw) for m in batch.messages)
        assert size <= 100_000 or len(batch.messages) == 1


# --- mbox details, against CPython ---------------------------------------------------------


CASES = {
    "quoted-from-and-from-without-space": (
        b"From a@b Mon Jan  1 00:00:00 2024\nSubject: one\n\n>From here\nFrom-line\n"
        b"Fromage\nnot at start From x\n\nFrom c@d Tue Jan  2 00:00:00 2024\nSubject: two\n\n"
        b"body\n",
        2,
    ),
    "unquoted-from-line-splits-mboxo": (
        b"From a\nSubject: one\n\nline\nFrom the body\nmore\n",
        2,
    ),
    "crlf": (
        b"From a\r\nSubject: one\r\n\r\nbody\r\n\r\nFrom b\r\nSubject: two\r\n\r\nbody\r\n",
        2,
    ),
    "no-trailing-newline": (b"From a\nSubject: one\n\nlast line", 1),
    "blank-line-at-end": (b"From a\nSubject: one\n\nbody\n\n", 1),
    "two-blank-lines-before-next": (b"From a\n\nbody\n\n\nFrom b\n\nx\n", 2),
    "from-line-only-at-eof": (b"From a\nSubject: one\n\nbody\nFrom b", 2),
    "consecutive-from-lines": (b"From a\nFrom b\nFrom c\n\nFrom d\n", 4),
    "leading-blank-lines": (b"\n\r\n \nFrom a\nSubject: x\n\nbody\n", 1),
    "binary-and-8bit": (b"From a\nSubject: \xe9\xff\x00\r\n\n\x00\x01body\rcr\n", 1),
    "empty": (b"", 0),
    "only-blank-lines": (b"\n\n\r\n", 0),
}


@pytest.mark.parametrize(("data", "count"), CASES.values(), ids=list(CASES))
@pytest.mark.parametrize("chunk", [8, 1024 * 1024])
def test_mbox_edge_cases_match_cpython(
    env: ProviderEnvironment, import_root: Path, data: bytes, count: int, chunk: int
) -> None:
    provider = mbox_in(env, data, chunk_bytes=chunk)
    _, messages = fetch_all(provider)
    expected = cpython_messages(import_root / "test.mbox")
    assert len(expected) == count
    assert [m.raw for m in messages] == expected


def test_quoted_from_stays_quoted_and_crlf_stays_crlf(env: ProviderEnvironment) -> None:
    data = (
        b"From a\r\nSubject: one\r\n\r\n>From here\r\nFrom-dash\r\n\r\n"
        b"From b\r\nSubject: two\r\n\r\nend"
    )
    _, messages = fetch_all(mbox_in(env, data))
    assert [m.raw for m in messages] == [
        # a blank CRLF line is not the "\n" line CPython drops before a From line
        b"Subject: one\r\n\r\n>From here\r\nFrom-dash\r\n\r\n",
        b"Subject: two\r\n\r\nend",
    ]
    assert [m.provider_message_id for m in messages] == ["0", str(data.index(b"From b"))]


def test_random_mbox_files_match_cpython_and_resume_exactly(
    env: ProviderEnvironment, import_root: Path
) -> None:
    pieces = [
        b"From x@y Sat Jan  3 01:05:34 1996\n",
        b"From ",
        b"From",
        b">From quoted\n",
        b"\n",
        b"\r\n",
        b"\r",
        b"Subject: hello\n",
        b"body text\n",
        b"  From indented\n",
        b"\xff\xfe\x00",
        b"x" * 40,
    ]
    rng = random.Random(20240601)
    path = import_root / "test.mbox"
    for case in range(150):
        data = b"From first\n" + b"".join(rng.choices(pieces, k=rng.randrange(0, 40)))
        path.write_bytes(data)
        expected = cpython_messages(path)
        options = {"chunk_bytes": rng.choice([8, 9, 16, 50]), "batch_messages": 2}
        batches, messages = fetch_all(MboxImport({"localFilePath": path.name}, env, **options))
        assert [m.raw for m in messages] == expected, (case, data)
        done = 0
        for batch in batches:
            done += len(batch.messages)
            fresh = MboxImport({"localFilePath": path.name}, env, **options)
            _, rest = fetch_all(fresh, batch.cursor)
            assert [m.raw for m in rest] == expected[done:], (case, data, batch.cursor)


def test_an_empty_mbox_is_valid_and_imports_nothing(env: ProviderEnvironment) -> None:
    batches, messages = fetch_all(mbox_in(env, b""))
    assert batches == []
    assert messages == []


@pytest.mark.parametrize(
    "data", [b"Subject: no From line\n\nbody\n", b"\n\nhello\nFrom a\n", b"%PDF-1.4\n", b"Fro"]
)
def test_a_file_that_is_not_an_mbox_is_refused(
    env: ProviderEnvironment, import_root: Path, data: bytes
) -> None:
    (import_root / "x.mbox").write_bytes(data)
    provider = MboxImport({"localFilePath": "x.mbox"}, env)
    with pytest.raises(InvalidArgument) as caught:
        provider.check_connection()
    assert caught.value.field == "providerConfig.localFilePath"
    assert "is not an mbox file" in caught.value.description
    with pytest.raises(InvalidArgument):
        list(provider.fetch(Mailbox("x.mbox", "x.mbox"), None, NO_CONTEXT))


def test_a_message_over_the_size_limit_stops_the_import(env: ProviderEnvironment) -> None:
    data = b"From a\n\nsmall\n\nFrom b\n\n" + b"x" * 5000 + b"\n\nFrom c\n\nsmall\n"
    provider = mbox_in(env, data, chunk_bytes=64, max_message_bytes=1000)
    with pytest.raises(ProviderDataError, match="larger than the limit"):
        fetch_all(provider)


def test_a_file_changed_under_the_import_is_refused(
    env: ProviderEnvironment, import_root: Path
) -> None:
    provider = mbox_in(env, b"From a\n\none\n\nFrom b\n\ntwo\n", batch_messages=1)
    first = next(iter(provider.fetch(Mailbox("test.mbox", "test.mbox"), None, NO_CONTEXT)))
    (import_root / "test.mbox").write_bytes(b"From a\n\none!\n\nFrom b\n\ntwo\n")
    with pytest.raises(ProviderDataError, match="changed"):
        fetch_all(provider, first.cursor)
    # same size, but the cursor no longer points at a From line
    (import_root / "test.mbox").write_bytes(b"From a\n\nonetwo\n\nFrom b\n\n\n")
    with pytest.raises(ProviderDataError):
        fetch_all(provider, first.cursor)


def test_fetch_refuses_an_unknown_mailbox(env: ProviderEnvironment) -> None:
    provider = mbox_in(env, b"From a\n\n")
    with pytest.raises(InvalidArgument) as caught:
        list(provider.fetch(Mailbox("other.mbox", "other.mbox"), None, NO_CONTEXT))
    assert caught.value.field == "mailbox"


# --- path rules (shared by every file import) -----------------------------------------


def refused(
    env: ProviderEnvironment,
    provider_class: type[MboxImport | EmlImport | PstImport],
    **config: str,
) -> str:
    with pytest.raises(InvalidArgument) as caught:
        provider_class(provider_class.validate_config(config), env).check_connection()
    name = next(iter(config))
    assert caught.value.field == f"providerConfig.{name}"
    return caught.value.description


@pytest.mark.parametrize("cls", [MboxImport, EmlImport, PstImport], ids=lambda c: c.name)
def test_a_path_outside_the_import_root_is_refused(
    env: ProviderEnvironment, tmp_path: Path, cls: type[MboxImport | EmlImport | PstImport]
) -> None:
    outside = tmp_path / "elsewhere.mbox"
    outside.write_bytes(b"From a\n\n")
    assert "IMPORT_ROOT" in refused(env, cls, localFilePath=str(outside))
    # not even a missing file outside the root is looked at
    assert "IMPORT_ROOT" in refused(env, cls, localFilePath="/etc/no-such-file")
    assert "IMPORT_ROOT" in refused(env, cls, localFilePath="/etc/passwd")


@pytest.mark.parametrize("path", ["../elsewhere.mbox", "a/../../x", "..", "a\\..\\b"])
def test_dot_dot_is_refused_before_the_filesystem_is_consulted(path: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        MboxImport.validate_config({"localFilePath": path})
    assert caught.value.field == "providerConfig.localFilePath"
    assert "'..'" in caught.value.description


def test_a_symlink_that_escapes_the_root_is_refused(
    env: ProviderEnvironment, import_root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.mbox"
    outside.write_bytes(b"From a\n\nsecret\n")
    (import_root / "link.mbox").symlink_to(outside)
    (import_root / "dir-link").symlink_to(tmp_path)
    assert "symbolic link" in refused(env, MboxImport, localFilePath="link.mbox")
    assert "symbolic link" in refused(env, MboxImport, localFilePath=str(import_root / "link.mbox"))
    assert "symbolic link" in refused(env, MboxImport, localFilePath="dir-link/secret.mbox")
    provider = MboxImport({"localFilePath": "link.mbox"}, env)
    with pytest.raises(InvalidArgument):
        list(provider.fetch(Mailbox("link.mbox", "link.mbox"), None, NO_CONTEXT))


def test_a_symlink_inside_the_root_is_followed(env: ProviderEnvironment, import_root: Path) -> None:
    (import_root / "real.mbox").write_bytes(b"From a\nSubject: hi\n\nhello\n")
    (import_root / "sub").mkdir()
    (import_root / "sub" / "link.mbox").symlink_to(import_root / "real.mbox")
    provider = MboxImport({"localFilePath": "sub/link.mbox"}, env)
    provider.check_connection()
    assert provider.list_mailboxes() == [Mailbox("link.mbox", "link.mbox")]
    messages = fetch_all(provider)[1]
    assert [m.raw for m in messages] == [b"Subject: hi\n\nhello\n"]
    assert [m.folder_paths[0] for m in messages] == ["link.mbox"]  # the mailbox's name


def test_missing_and_unsuitable_paths_are_explained(
    env: ProviderEnvironment, import_root: Path
) -> None:
    assert refused(env, MboxImport, localFilePath="nope.mbox") == "does not exist"
    (import_root / "folder").mkdir()
    assert refused(env, MboxImport, localFilePath="folder") == "is a folder, not a file"
    os.mkfifo(import_root / "fifo.mbox")
    assert refused(env, MboxImport, localFilePath="fifo.mbox") == "is not a regular file"
    (import_root / "loop").symlink_to(import_root / "loop")
    assert "cannot be resolved" in refused(env, MboxImport, localFilePath="loop")


def test_uploads_live_under_the_upload_root(
    env: ProviderEnvironment, import_root: Path, tmp_path: Path
) -> None:
    uploads = tmp_path / "uploads"
    (uploads / "2024").mkdir(parents=True)
    (uploads / "2024" / "u.mbox").write_bytes(b"From a\nSubject: up\n\nup\n")
    provider = MboxImport(MboxImport.validate_config({"uploadedFilePath": "2024/u.mbox"}), env)
    provider.check_connection()
    assert [m.raw for m in fetch_all(provider)[1]] == [b"Subject: up\n\nup\n"]
    # an upload path cannot reach the import root, nor the other way round
    (import_root / "i.mbox").write_bytes(b"From a\n\n")
    assert "UPLOAD_ROOT" in refused(env, MboxImport, uploadedFilePath=str(import_root / "i.mbox"))
    assert "IMPORT_ROOT" in refused(env, MboxImport, localFilePath=str(uploads / "2024" / "u.mbox"))


@pytest.mark.parametrize("name", ["mbox_import", "eml_import", "pst_import"])
def test_a_successful_import_removes_the_upload_and_never_a_local_file(
    env: ProviderEnvironment, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    env.upload_root.mkdir()
    upload = env.upload_root / "1234.upload"
    local = env.import_root / "1234.upload"
    upload.write_bytes(b"uploaded")
    local.write_bytes(b"local")
    cls = provider_class(name)  # as the engine builds it: (config, environment)
    cls({"localFilePath": "1234.upload"}, env).after_successful_import()
    assert local.read_bytes() == b"local"
    caplog.set_level(logging.INFO)
    cls({"uploadedFilePath": "1234.upload"}, env).after_successful_import()
    assert not upload.exists()
    assert "removed the uploaded file '1234.upload'" in caplog.text
    cls({"uploadedFilePath": "1234.upload"}, env).after_successful_import()  # gone: fine
    assert "already gone" in caplog.text
    assert local.read_bytes() == b"local"


def test_only_what_the_upload_endpoint_stored_is_ever_removed(
    env: ProviderEnvironment, tmp_path: Path
) -> None:
    env.upload_root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    kept = outside / "x.upload"
    kept.write_bytes(b"keep")
    (env.upload_root / "dir-link").symlink_to(outside)
    (env.upload_root / "2024").mkdir()
    (env.upload_root / "2024" / "u.upload").write_bytes(b"keep")
    (env.upload_root / "u.mbox").write_bytes(b"keep")
    for given in (
        "dir-link/x.upload",
        str(kept),
        "sub/../../outside/x.upload",
        ".",
        "2024/u.upload",  # not where the endpoint stores uploads
        "u.mbox",  # not a name the endpoint gives
    ):
        MboxImport({"uploadedFilePath": given}, env).after_successful_import()
    assert kept.read_bytes() == b"keep"
    assert (env.upload_root / "2024" / "u.upload").read_bytes() == b"keep"
    assert (env.upload_root / "u.mbox").read_bytes() == b"keep"
    # a link in the root is removed itself, never what it points at
    (env.upload_root / "link.upload").symlink_to(kept)
    MboxImport({"uploadedFilePath": "link.upload"}, env).after_successful_import()
    assert not (env.upload_root / "link.upload").is_symlink()
    assert kept.read_bytes() == b"keep"
    # an absolute path to an upload is the same upload
    (env.upload_root / "abs.upload").write_bytes(b"x")
    MboxImport(
        {"uploadedFilePath": str(env.upload_root / "abs.upload")}, env
    ).after_successful_import()
    assert not (env.upload_root / "abs.upload").exists()


def test_an_unknown_limit_is_refused() -> None:
    with pytest.raises(TypeError, match="no limit 'max_ratio'"):
        MboxImport({"localFilePath": "x.mbox"}, NO_ENVIRONMENT, max_ratio=3)


def test_closing_the_batches_closes_the_file(env: ProviderEnvironment, import_root: Path) -> None:
    provider = mbox_in(env, b"From a\n\none\n\nFrom b\n\ntwo\n", batch_messages=1)
    path = str(import_root / "test.mbox")

    def open_files() -> set[str]:
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                found.add(os.readlink(f"/proc/self/fd/{fd}"))
        return found

    batches = provider.fetch(Mailbox("test.mbox", "test.mbox"), None, NO_CONTEXT)
    assert isinstance(batches, Generator)
    next(batches)
    assert path in open_files()
    batches.close()  # the engine does this when it stops early
    assert path not in open_files()
