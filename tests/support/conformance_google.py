"""google_workspace on the session's fake Google: a domain of its own per source,
what its archive must then hold, and the provider conformance suite's case
(tests/integration/test_provider_conformance.py).

The fake is shared by the whole test session (the server and every worker reach
it through GOOGLE_API_ENDPOINT), so each `GoogleDomain` has a domain name, a
service account and an admin no other test uses, and its sources select their
users with `includeUsers: ["*@<domain>"]`: the Directory lists everyone's users.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from tests.support.conformance import Case, Expected, sha
from tests.support.corpora import HAM, SPAM, mbox_messages
from tests.support.fake_google import FakeGoogle

PROVIDER = "google_workspace"
# Part of the reason each kind of unreadable user is reported with.
SUSPENDED = "suspended"
NO_GMAIL = "Mail service not enabled"


class GoogleDomain:
    """A Google Workspace domain on the fake, and what its archive must hold."""

    def __init__(self, fake: FakeGoogle) -> None:
        tag = uuid.uuid4().hex[:10]
        self.fake = fake
        self.name = f"d{tag}.example.com"
        # A service account of its own: delegation is granted and revoked per account.
        self.key = fake.new_key(client_email=f"archiver-{tag}@fake-project.iam.gserviceaccount.com")
        self.admin = f"admin@{self.name}"
        fake.add_user(self.admin, admin=True)
        # Every message of the corpora at most once per domain: no two messages of
        # one user share bytes, so each is one archived row.
        self._corpus = iter(mbox_messages(HAM) + mbox_messages(SPAM))
        # What the archive must hold: {user email: {sha256: folder paths}}.
        self.expected: dict[str, dict[str, set[str]]] = {}
        self.raw: dict[str, bytes] = {}
        self.skipped: dict[str, str] = {}
        self.users: list[str] = []
        # Gmail message id -> (user, sha256) of every message added.
        self.messages: dict[str, tuple[str, str]] = {}
        # Message id -> the folder paths of a message failing for now.
        self.failing: dict[str, set[str]] = {}

    def user(self, local: str, *, suspended: bool = False, gmail: bool = True) -> str:
        """A new user `local@<domain>`; one that cannot be read is expected skipped."""
        email = f"{local}@{self.name}"
        self.fake.add_user(email, suspended=suspended, gmail=gmail)
        self.users.append(email)
        if suspended:
            self.skipped[email] = SUSPENDED
        elif not gmail:
            self.skipped[email] = NO_GMAIL
        else:
            self.expected[email] = {}
        return email

    def add(
        self,
        email: str,
        count: int,
        labels: Sequence[str] = ("INBOX",),
        paths: Sequence[str] | None = ("INBOX",),
    ) -> list[str]:
        """`count` corpus messages delivered to `email` with these label ids; the
        archive must hold them in `paths` (None: it must not hold them)."""
        ids = []
        for _ in range(count):
            raw = next(self._corpus)
            digest = sha(raw)
            message_id = self.fake.add_message(email, raw, labels)
            self.messages[message_id] = (email, digest)
            self.raw[digest] = raw
            if paths is not None:
                self.expected[email][digest] = set(paths)
            ids.append(message_id)
        return ids

    def vanish(self, message_id: str) -> None:
        """Still listed, but gone by the time it is fetched: counted skipped."""
        email, digest = self.messages[message_id]
        self.fake.vanish_on_get(email, message_id)
        del self.expected[email][digest]

    def fail(self, message_id: str) -> None:
        """Its get answers 400 failedPrecondition (not retried): counted failed,
        and tried again on the next run."""
        email, digest = self.messages[message_id]
        self.fake.break_message(email, message_id, 400)
        self.failing[message_id] = self.expected[email].pop(digest)

    def repair(self, message_id: str) -> None:
        email, digest = self.messages[message_id]
        self.fake.repair_message(email, message_id)
        self.expected[email][digest] = self.failing.pop(message_id)

    def config(self, **changes: Any) -> dict[str, Any]:
        """The providerConfig of a source reading this domain's users (not the admin)."""
        return {
            "serviceAccountKeyJson": self.key.json,
            "impersonatedAdminEmail": self.admin,
            "includeUsers": [f"*@{self.name}"],
            "excludeUsers": ["admin@*"],
            **changes,
        }

    def downloads(self, email: str | None = None) -> int:
        """messages.get calls the fake answered as this domain's users (or `email`)."""
        return sum(
            self.fake.count(api="messages.get", email=user)
            for user in ([email] if email else self.users)
        )

    def secrets(self) -> list[str]:
        """What must never be in a response, a log line or an error: the key file, its
        private key (whole, and the first and last lines of its base64 body), and
        every access token and signed assertion the fake has seen."""
        lines = self.key.private_key_pem.strip().splitlines()[1:-1]
        return [
            self.key.json,
            self.key.private_key_pem,
            lines[0],
            lines[-2],
            *self.fake.issued_tokens,
            *(a for a in self.fake.assertions if a),
        ]


def google_case(fake: FakeGoogle) -> Iterator[Case]:
    """The conformance case of `google_workspace`.

    Small: alice (30 messages, every third one in INBOX and a nested user label:
    one archived message, two folders) and bob (20 in SENT), each with one message
    gone between list and get (skipped) and one failing with 400 (failed); carol
    suspended in the Directory and dave without Gmail, both skipped. Big: erin
    alone with 250 messages in INBOX, which the engine's shared quota (250 units/s
    a user, 5 a message: 50 messages/s) stretches over 5 s, long enough to be
    caught after the first batch of 50 and before the end.
    """
    state: dict[str, GoogleDomain] = {}

    def config(big: bool) -> dict[str, Any]:
        domain = state["domain"] = GoogleDomain(fake)
        if big:
            domain.add(domain.user("erin"), 250)
            return domain.config()
        alice = domain.user("alice")
        projects = fake.add_label(alice, "Projects/2024")
        for index in range(30):
            if index % 3 == 0:
                domain.add(alice, 1, ["INBOX", projects, "UNREAD"], ["INBOX", "Projects/2024"])
            else:
                domain.add(alice, 1)
        bob = domain.user("bob")
        domain.add(bob, 20, ["SENT"], ["SENT"])
        for email in (alice, bob):
            ids = [i for i, (user, _) in domain.messages.items() if user == email]
            domain.vanish(ids[3])
            domain.fail(ids[7])
        domain.user("carol", suspended=True)
        domain.user("dave", gmail=False)
        return domain.config()

    def expected(big: bool) -> Expected:
        domain = state["domain"]
        readable = 0 if big else len(domain.expected)
        return Expected(
            domain.expected,
            domain.raw,
            dict(domain.skipped),
            messages_skipped=readable,
            messages_failed=readable,
        )

    yield Case(PROVIDER, config, expected, downloads=lambda: state["domain"].downloads())
