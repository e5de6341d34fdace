"""The microsoft_365 case of the provider conformance suite
(tests/integration/test_provider_conformance.py), on the session's fake of Graph.

Each source gets a domain and an app registration of its own (the fake is shared
by the whole test run) and is read at Graph's declared pace (16 requests/s per
mailbox after a burst of 50), as the suite's workers run with the declared limits:
the small tenant fits in the burst, and the big one is slow enough to be caught
mid-folder.

The small tenant: alice (nested, hidden and non-ASCII folders; one message gone
before its download: 404, counted skipped) and bob (one message Graph refuses to
serve: 403, counted failed and tried again on the next run) are archived; carol (no
Exchange Online licence) and a guest are skipped mailboxes. The big one: alice
with 210 messages, 200 of them in Inbox.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from tests.support.conformance import Case, Expected, sha
from tests.support.corpora import HAM, SPAM, mbox_messages
from tests.support.fake_graph import FakeGraph, FakeUser

# (folder path, hidden, messages); parents come before their children.
SMALL_ALICE = (
    ("Inbox", False, 8),
    ("Inbox/Projekte", False, 3),
    ("Inbox/Projekte/Größe 2002", False, 2),
    ("Sync Issues", True, 2),
    ("Boîte de réception", False, 0),
    ("Boîte de réception/アーカイブ", False, 2),
    ("Junk Email", False, 2),
    ("Deleted Items", False, 2),
)
SMALL_BOB = (("Inbox", False, 6), ("Archive", False, 4))
# Inbox first (folders are read by path): the kill lands inside it.
BIG_ALICE = (("Inbox", False, 200), ("Sent Items", False, 10))

SKIP_NO_MAILBOX = "no Exchange Online mailbox"
SKIP_GUEST = "guest account"


def m365_case(fake: FakeGraph) -> Iterator[Case]:
    corpus = mbox_messages(HAM) + mbox_messages(SPAM)
    users: list[FakeUser] = []
    # {UPN: {message id: (raw, folder path)}} of what the source must archive.
    archivable: dict[str, dict[str, tuple[bytes, str]]] = {}
    skipped: dict[str, str] = {}
    unfetchable = {"skipped": 0, "failed": 0}

    def mailbox(
        upn: str, layout: tuple[tuple[str, bool, int], ...], mail: Iterator[bytes]
    ) -> FakeUser:
        user = fake.add_user(upn)
        users.append(user)
        archivable[upn] = {}
        for path, hidden, count in layout:
            parent, _, name = path.rpartition("/")
            if path not in {f.path for f in user.folders.values()}:
                fake.add_folder(user, name, parent or None, hidden=hidden)
            raws = [next(mail) for _ in range(count)]
            ids = fake.add_messages(user, user.folder(path), raws)
            archivable[upn].update({i: (raw, path) for i, raw in zip(ids, raws, strict=True)})
        return user

    def config(big: bool) -> dict[str, Any]:
        archivable.clear()
        skipped.clear()
        unfetchable.update(skipped=0, failed=0)
        domain = f"c{uuid.uuid4().hex[:10]}.contoso.example"
        # Marked: no other source of the test run holds the same bytes.
        mail = (b"X-Conformance: %s\r\n" % domain.encode() + raw for raw in corpus)
        app = fake.add_app()
        if big:
            mailbox(f"alice@{domain}", BIG_ALICE, mail)
        else:
            alice = mailbox(f"alice@{domain}", SMALL_ALICE, mail)
            bob = mailbox(f"bob@{domain}", SMALL_BOB, mail)
            gone = next(i for i, (_, path) in archivable[alice.upn].items() if path == "Inbox")
            fake.fail_value(gone, status=404, code="ErrorItemNotFound")
            del archivable[alice.upn][gone]
            unfetchable["skipped"] += 1
            # Not retried within the run (unlike a 5xx): one attempt per run.
            failing = next(iter(archivable[bob.upn]))
            fake.fail_value(failing, status=403, code="ErrorAccessDenied")
            del archivable[bob.upn][failing]
            unfetchable["failed"] += 1
            users.append(fake.add_user(f"carol@{domain}", mailbox=False))
            skipped[users[-1].upn] = SKIP_NO_MAILBOX
            users.append(fake.add_user(f"dave_partner.example#EXT#@{domain}", guest=True))
            skipped[users[-1].upn] = SKIP_GUEST
        return {
            "tenantId": fake.tenant_id,
            "clientId": app.client_id,
            "clientSecret": app.secret,
            "includeUsers": [f"*@{domain}"],
        }

    def expected(big: bool) -> Expected:
        return Expected(
            mailboxes={
                upn: {sha(raw): {path} for raw, path in mail.values()}
                for upn, mail in archivable.items()
            },
            raw={sha(raw): raw for mail in archivable.values() for raw, _ in mail.values()},
            skipped=dict(skipped),
            messages_skipped=unfetchable["skipped"],
            messages_failed=unfetchable["failed"],
        )

    def downloads() -> int:
        return sum(sum(fake.value_requests(user).values()) for user in users)

    yield Case("microsoft_365", config, expected, downloads=downloads)
    for user in users:  # the fake lives as long as the test run
        fake.remove_user(user)
