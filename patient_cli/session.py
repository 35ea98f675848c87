"""A command's working context: settings, database connection, keys and actor.

Service functions take a Session so tests and other front ends can build one
without the CLI. Keys and HMAC secrets are loaded lazily, once. Importing this
module does not import psycopg (about 0.2 s): `import` forks its workers and
starts them on the first files before that (see importer).
"""

from __future__ import annotations

import contextlib
import os
import pwd
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from patient_cli.config import Settings
from patient_cli.crypto import Keyring

if TYPE_CHECKING:
    from types import TracebackType

    from patient_cli.db import Connection


@dataclass(frozen=True)
class Actor:
    """Who is acting, as recorded in the audit trail."""

    os_user: str
    db_role: str
    name: str | None


def os_user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


@dataclass
class Session:
    """Connects on first use, so input errors are reported before any network work."""

    settings: Settings
    actor_name: str | None = None
    _keyring: Keyring | None = None
    _conn: Connection | None = None
    _actor: Actor | None = None
    _secrets: dict[str, bytes] = field(default_factory=dict)

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            from patient_cli.db import connect

            self._conn = connect(self.settings)
        return self._conn

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    @property
    def actor(self) -> Actor:
        if self._actor is None:  # the same for the whole session: look it up once
            name = self.actor_name or self.settings.actor
            self._actor = Actor(os_user_name(), self.conn.info.user, name)
        return self._actor

    @property
    def keyring(self) -> Keyring:
        if self._keyring is None:
            from patient_cli.keysource import load_keyring

            self._keyring = load_keyring(self.settings.key_source)
        return self._keyring

    def secret(self, name: str) -> bytes:
        """The HMAC secret `name`; call before opening a work transaction so that a
        freshly created secret is committed on its own and never rolled back."""
        from patient_cli import app_secrets

        if name not in self._secrets:
            if _idle(self.conn):
                with self.conn.transaction():
                    value = app_secrets.get_secret(self.conn, self.keyring, name)
            else:
                value = app_secrets.get_secret(self.conn, self.keyring, name)
            self._secrets[name] = value
        return self._secrets[name]

    def load_secrets(self) -> None:
        """Fetch (creating if needed) every HMAC secret, committed on its own, before
        a work transaction starts; a rollback of that work then cannot lose one."""
        from patient_cli import app_secrets

        missing = [name for name in app_secrets.SECRET_NAMES if name not in self._secrets]
        if not missing:
            return
        # One round trip in the usual case where they all exist already.
        idle = _idle(self.conn)
        found = app_secrets.get_existing_secrets(self.conn, self.keyring, missing)
        if idle:
            self.conn.commit()
        self._secrets.update(found)
        for name in missing:
            self.secret(name)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and self._conn is not None and not self._conn.closed:
            # The connection may already be gone; closing it is then enough.
            with contextlib.suppress(Exception):
                self._conn.rollback()
        self.close()


def _idle(conn: Connection) -> bool:
    """Whether `conn` is outside any transaction."""
    from psycopg.pq import TransactionStatus

    return conn.info.transaction_status == TransactionStatus.IDLE
