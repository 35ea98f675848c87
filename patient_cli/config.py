"""Configuration: which database to use and where the encryption key comes from.

Reads the environment (optionally seeded from a `.env` file, which real variables
override) using the variable names of the original service. Holds no secrets in
`repr`, so a settings object can be printed or logged safely.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from patient_cli.errors import ConfigError

DB_VARIABLES = ("DB_USERNAME", "DB_PASSWORD", "DB_HOST", "DB_PORT", "DB_NAME")
KEY_VARIABLES = ("ENCRYPTION_KEY", "ENCRYPTION_KEY_FILE", "ENCRYPTION_KEY_COMMAND")
# Every variable that changes what a command does (tests and benchmarks clear them).
CONFIG_VARIABLES = (
    "DATABASE_URL",
    *DB_VARIABLES,
    "DB_SSLMODE",
    *KEY_VARIABLES,
    "PATIENT_RECORDS_HOME",
    "PATIENT_RECORDS_ACTOR",
)
DEFAULT_CONNECT_TIMEOUT = "10"


@dataclass(frozen=True)
class KeySource:
    """Where the Fernet key(s) come from; `value` is never shown in repr."""

    kind: str  # "env", "file", "command", "default-file" or "none"
    value: str = field(default="", repr=False)
    path: Path | None = None

    def describe(self) -> str:
        if self.kind == "env":
            return "ENCRYPTION_KEY"
        if self.kind == "command":
            return "ENCRYPTION_KEY_COMMAND"
        if self.kind in ("file", "default-file"):
            return f"key file {self.path}"
        return "none"


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to know about its environment.

    An external database's settings (DATABASE_URL or the DB_* variables, read
    when the settings are loaded) are parsed on first use: psycopg's parser
    costs importing all of psycopg (about 0.2 s), which `import` overlaps with
    its workers' start. A malformed one is reported then, before connecting.
    """

    embedded: bool
    home: Path | None
    key_source: KeySource
    actor: str | None
    database_url: str | None = field(default=None, repr=False)  # may contain a password
    database_params: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def conninfo(self) -> str:
        """The libpq connection string ("" for the embedded server); may contain a password."""
        return "" if self.embedded else self._external[0]

    @property
    def display_database(self) -> str:
        """The database, for messages: never a password."""
        if self.embedded:
            return f"embedded PostgreSQL in {self.home}"
        return self._external[1]

    @functools.cached_property
    def _external(self) -> tuple[str, str]:
        return _external_conninfo(self.database_url, dict(self.database_params))


def load_env_file(env_file: Path | None) -> list[int]:
    """Seed os.environ from `env_file`, or from ./.env when none is named, and
    return the numbers of the lines where statements that could not be parsed
    start (skipped, as the original service's python-dotenv skipped them; the
    caller warns).

    Real environment variables win over the file (dotenv's override=False).
    PYTHON_DOTENV_DISABLED, python-dotenv's own switch, turns the file off.
    """
    if env_file is None:
        env_file = Path.cwd() / ".env"
        if not env_file.is_file():
            return []
    elif not env_file.is_file():
        raise ConfigError(f"env file not found: {env_file}")
    if os.environ.get("PYTHON_DOTENV_DISABLED", "").casefold() in ("1", "true", "t", "yes", "y"):
        return []
    try:
        # utf-8-sig: a byte-order mark some editors write is not part of the first name.
        text = env_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read env file {env_file}: it is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read env file {env_file}: {exc.strerror or exc}") from None
    # imported only when there is a file to read: it costs every command a few ms
    import io
    import logging

    from dotenv import load_dotenv
    from dotenv.parser import parse_stream

    unparsed = [b.original.line for b in parse_stream(io.StringIO(text)) if b.error]
    # python-dotenv also logs each such statement through `logging`, which -q
    # cannot silence and which is not our format: the caller reports them.
    logger = logging.getLogger("dotenv.main")
    was_disabled, logger.disabled = logger.disabled, True
    try:
        load_dotenv(stream=io.StringIO(text), override=False)
    except ValueError:  # the environment cannot hold a NUL character
        message = f"cannot use env file {env_file}: a value holds a NUL character"
        raise ConfigError(message) from None
    finally:
        logger.disabled = was_disabled
    return unparsed


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value


def load_settings() -> Settings:
    """Build Settings from the (already .env-seeded) environment."""
    url = _env("DATABASE_URL")
    embedded = url is None and all(_env(v) is None for v in DB_VARIABLES)
    home: Path | None = None
    params: dict[str, str] = {}
    if embedded:
        from patient_cli.embedded import default_home

        home = default_home()
    elif url is None:
        mapping = {
            "DB_USERNAME": "user",
            "DB_PASSWORD": "password",
            "DB_HOST": "host",
            "DB_PORT": "port",
            "DB_NAME": "dbname",
        }
        for var, key in mapping.items():
            value = _env(var)
            if value is not None:
                params[key] = value
    sslmode = _env("DB_SSLMODE")
    if sslmode is not None and not embedded:
        params["sslmode"] = sslmode
    return Settings(
        embedded=embedded,
        home=home,
        key_source=_key_source(home),
        actor=_env("PATIENT_RECORDS_ACTOR"),
        database_url=url,
        database_params=tuple(params.items()),
    )


def _external_conninfo(url: str | None, params: dict[str, str]) -> tuple[str, str]:
    """The connection string for DATABASE_URL (or "") completed by `params`,
    and how to show it; raises ConfigError when it does not parse."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        parsed = conninfo_to_dict(make_conninfo(url or "", **params))
    except Exception as exc:  # psycopg.ProgrammingError: malformed DSN
        raise ConfigError("DATABASE_URL is not a valid PostgreSQL connection string") from exc
    port = str(parsed.get("port", ""))
    if port and not port.isdigit():
        source = "DB_PORT" if "port" in params else "the port in DATABASE_URL"
        raise ConfigError(f"{source} must be a number")
    parsed.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    parsed.setdefault("application_name", "patient-records")
    conninfo = make_conninfo("", **{k: str(v) for k, v in parsed.items() if v is not None})
    display = "postgresql://{user}{pw}@{host}:{port}/{db}".format(
        user=parsed.get("user", ""),
        pw=":***" if parsed.get("password") else "",
        host=parsed.get("host", "localhost"),
        port=parsed.get("port", "5432"),
        db=parsed.get("dbname", ""),
    )
    return conninfo, display


def _key_source(home: Path | None) -> KeySource:
    given = [name for name in KEY_VARIABLES if _env(name) is not None]
    if len(given) > 1:
        raise ConfigError(f"set only one of {', '.join(given)}")
    if given == ["ENCRYPTION_KEY"]:
        return KeySource("env", value=os.environ["ENCRYPTION_KEY"])
    if given == ["ENCRYPTION_KEY_FILE"]:
        return KeySource("file", path=Path(os.environ["ENCRYPTION_KEY_FILE"]).expanduser())
    if given == ["ENCRYPTION_KEY_COMMAND"]:
        return KeySource("command", value=os.environ["ENCRYPTION_KEY_COMMAND"])
    if home is not None:
        return KeySource("default-file", path=default_key_file())
    return KeySource("none")


def default_key_file() -> Path:
    """The key file the embedded mode generates: $PATIENT_RECORDS_HOME/key or the config dir."""
    override = _env("PATIENT_RECORDS_HOME")
    if override is not None:
        return Path(override).expanduser() / "key"
    from platformdirs import user_config_dir

    return Path(user_config_dir("patient-records")) / "key"
