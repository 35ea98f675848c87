"""`list` end to end: ordering, filters, `--all`, output shapes, and the promise
that listing never reads (or needs) the stored file contents."""

from __future__ import annotations

import json
import re
import unicodedata
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import Cli, stderr_line
from patient_cli import sql


def execute(db_url: str, query: str, *params: Any) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(query, params)


def set_created_at(db_url: str, record_id: int, moment: str) -> None:
    execute(db_url, "UPDATE patient_records SET created_at = %s WHERE id = %s", moment, record_id)


def add(cli: Cli, username: str, name: str, *extra: str) -> int:
    return int(cli.json("add", "-u", username, "-n", name, *extra)["record_id"])


def listed(cli: Cli, *args: str) -> list[dict[str, Any]]:
    return list(cli.json("list", *args)["records"])


def assert_usage_error(result: Any, message: str) -> None:
    assert result.exit_code == 2, result.stderr
    assert json.loads(stderr_line(result)) == {"error": message, "code": 2, "type": "usage_error"}
    assert result.stdout == ""


def test_json_shape_of_a_record_with_a_file(ready: Cli, tmp_path: Path) -> None:
    (tmp_path / "ecg.pdf").write_bytes(b"%PDF-1.7\n" + bytes(100))
    record_id = add(ready, "amy", "ECG", "-d", "sinus rhythm", "-f", "ecg.pdf")
    (record,) = listed(ready, "-u", "amy")
    created = record.pop("created_at")
    assert record == {
        "id": record_id,
        "username": "amy",
        "record_name": "ECG",
        "record_data": "sinus rhythm",
        "has_file": True,
        "file_type": "application/pdf",
        "file_name": "ecg.pdf",
        "file_size": 109,
    }
    moment = datetime.fromisoformat(created)
    assert moment.utcoffset() is not None  # ISO 8601 with an offset
    assert abs((datetime.now(UTC) - moment).total_seconds()) < 60


def test_newest_first_by_created_at_then_id(ready: Cli, db_url: str) -> None:
    # Ids deliberately do not follow time: the smallest id is the newest record.
    newest, tie_low, tie_high, oldest = (add(ready, "ben", f"r{i}") for i in range(4))
    set_created_at(db_url, newest, "2024-06-01T08:00:00Z")
    set_created_at(db_url, tie_low, "2024-05-02T08:00:00Z")
    set_created_at(db_url, tie_high, "2024-05-02T08:00:00Z")
    set_created_at(db_url, oldest, "2024-05-01T08:00:00Z")
    expected = [newest, tie_high, tie_low, oldest]
    assert [r["id"] for r in listed(ready, "-u", "ben")] == expected
    assert [r["id"] for r in listed(ready, "--all")] == expected


def test_limit(ready: Cli) -> None:
    ids = [add(ready, "cid", f"r{i}") for i in range(4)]
    assert [r["id"] for r in listed(ready, "-u", "cid", "--limit", "2")] == ids[::-1][:2]
    assert [r["id"] for r in listed(ready, "-u", "cid", "-l", "10")] == ids[::-1]


@pytest.mark.parametrize("value", ["0", "-1"])
def test_limit_must_be_positive(ready: Cli, value: str) -> None:
    assert_usage_error(
        ready("list", "-u", "cid", "--limit", value), "--limit must be between 1 and 1000000"
    )


def test_since_and_until(ready: Cli, db_url: str) -> None:
    day1 = add(ready, "dan", "day one")
    day2_late = add(ready, "dan", "day two, late")
    day3_midnight = add(ready, "dan", "day three, midnight")
    set_created_at(db_url, day1, "2024-01-01T10:00:00Z")
    set_created_at(db_url, day2_late, "2024-01-02T23:59:59Z")
    set_created_at(db_url, day3_midnight, "2024-01-03T00:00:00Z")

    def ids(*args: str) -> list[int]:
        return [r["id"] for r in listed(ready, "-u", "dan", *args)]

    assert ids("--since", "2024-01-02") == [day3_midnight, day2_late]
    assert ids("--until", "2024-01-02") == [day2_late, day1]  # a bare date includes that day
    assert ids("--since", "2024-01-02", "--until", "2024-01-02") == [day2_late]
    assert ids("--since", "2024-01-02T23:59:59+00:00") == [day3_midnight, day2_late]
    assert ids("--since", "2024-01-03T02:00:00+02:00") == [day3_midnight]  # midnight UTC
    assert ids("--since", "2024-01-03T01:00:00+02:00") == [day3_midnight, day2_late]
    assert ids("--until", "2024-01-02T23:59:59") == [day1]  # naive is UTC; the bound is exclusive
    assert ids("--since", "2030-01-01") == []


def test_date_bounds_at_the_edges_of_the_calendar(ready: Cli, db_url: str) -> None:
    early = add(ready, "dov", "early")
    late = add(ready, "dov", "late")
    set_created_at(db_url, early, "2024-01-02T10:00:00Z")
    set_created_at(db_url, late, "2024-01-03T10:00:00Z")

    def ids(*args: str) -> list[int]:
        return [r["id"] for r in listed(ready, "-u", "dov", *args)]

    # The last representable day is a valid --until (not an internal error).
    assert ids("--until", "9999-12-31") == [late, early]
    assert ids("--since", "0001-01-01", "--until", "9999-12-31") == [late, early]
    # The ISO basic form of a bare date includes that day, like the extended form.
    assert ids("--until", "20240102") == ids("--until", "2024-01-02") == [early]


@pytest.mark.parametrize("option", ["--since", "--until"])
@pytest.mark.parametrize("value", ["yesterday", "2024-13-01", "01/02/2024"])
def test_bad_dates_are_usage_errors(ready: Cli, option: str, value: str) -> None:
    assert_usage_error(
        ready("list", "-u", "dan", option, value),
        f"{option} must be an ISO date like 2026-01-31 or 2026-01-31T08:00",
    )


def test_name_contains_is_case_insensitive_and_applies_before_limit(ready: Cli) -> None:
    first = add(ready, "eli", "Blood test January")
    add(ready, "eli", "X-ray")
    second = add(ready, "eli", "BLOOD pressure")
    add(ready, "eli", "MRI")
    assert [r["id"] for r in listed(ready, "-u", "eli", "--name-contains", "blood")] == [
        second,
        first,
    ]
    limited = listed(ready, "-u", "eli", "--name-contains", "Blood", "--limit", "1")
    assert [r["id"] for r in limited] == [second]
    assert listed(ready, "-u", "eli", "--name-contains", "nothing like it") == []


def test_name_contains_unicode(ready: Cli) -> None:
    wanted = add(ready, "fay", "Échographie 🫀")
    add(ready, "fay", "Radio")
    assert [r["id"] for r in listed(ready, "-u", "fay", "--name-contains", "échographie")] == [
        wanted
    ]


def test_name_contains_matches_across_unicode_normal_forms(ready: Cli) -> None:
    # A name taken from a macOS file name is decomposed (NFD); a terminal types
    # the composed form (NFC). Both spell the same name.
    decomposed = add(ready, "fay", unicodedata.normalize("NFD", "Échographie cardiaque"))
    composed = add(ready, "fay", "Bilan sanguin détaillé")
    assert [r["id"] for r in listed(ready, "-u", "fay", "--name-contains", "échographie")] == [
        decomposed
    ]
    nfd_needle = unicodedata.normalize("NFD", "détaillé")
    assert [r["id"] for r in listed(ready, "-u", "fay", "--name-contains", nfd_needle)] == [
        composed
    ]


def test_all_lists_every_patient(ready: Cli) -> None:
    a = add(ready, "gus", "a")
    b = add(ready, "hal", "b")
    everything = listed(ready, "--all")
    assert [(r["id"], r["username"]) for r in everything] == [(b, "hal"), (a, "gus")]
    assert [r["id"] for r in listed(ready, "-u", "gus")] == [a]


def test_all_and_username_together_are_refused(ready: Cli) -> None:
    assert_usage_error(
        ready("list", "-u", "gus", "--all"), "give either --username or --all, not both"
    )


def test_username_or_all_is_required(ready: Cli) -> None:
    assert_usage_error(ready("list"), "username must not be empty (or use --all)")
    assert_usage_error(ready("list", "-u", " "), "username must not be empty")


def test_unknown_user_gives_an_empty_list(ready: Cli) -> None:
    add(ready, "ida", "r")
    result = ready("list", "-u", "nobody-here", "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"records": []}


def test_ndjson_is_one_record_per_line(ready: Cli) -> None:
    first = add(ready, "jon", "first")
    second = add(ready, "jon", "second")
    result = ready("list", "-u", "jon", "--format", "ndjson")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [second, first]


def test_ndjson_of_nothing_prints_nothing(ready: Cli) -> None:
    result = ready("list", "-u", "nobody", "--format", "ndjson")
    assert (result.exit_code, result.stdout) == (0, "")


def test_table_shows_records(ready: Cli) -> None:
    add(ready, "kim", "Allergy list", "-d", "penicillin")
    result = ready("list", "-u", "kim", "--format", "table")
    assert result.exit_code == 0
    assert "Allergy list" in result.stdout and "penicillin" in result.stdout
    assert "1 record(s)" in result.stdout


def test_list_sql_never_selects_file_contents() -> None:
    query = " ".join(sql.LIST_RECORDS.split())
    assert "record_chunks" not in query and "token" not in query
    # The legacy plaintext column is only tested for NULL and measured (from the
    # TOAST header), never selected.
    uses = re.findall(r"[\w(]*file_data[\w)]*(?: IS NOT NULL)?", query)
    assert sorted(uses) == ["file_data IS NOT NULL", "octet_length(file_data)"]


def test_list_neither_reads_nor_decrypts_chunks(ready: Cli, db_url: str, tmp_path: Path) -> None:
    (tmp_path / "scan.bin").write_bytes(b"\x01" * 5000)
    record_id = add(ready, "lea", "scan", "-f", "scan.bin")
    # Damage every chunk, then take the chunk table away altogether: list must not care.
    execute(db_url, "UPDATE record_chunks SET token = 'garbage'::bytea")
    execute(db_url, "ALTER TABLE record_chunks RENAME TO record_chunks_away")
    try:
        (record,) = listed(ready, "-u", "lea")
    finally:
        execute(db_url, "ALTER TABLE record_chunks_away RENAME TO record_chunks")
    assert (record["id"], record["has_file"], record["file_size"]) == (record_id, True, 5000)


def test_list_is_audited_without_contents(ready: Cli, db_url: str) -> None:
    add(ready, "max", "Secret diagnosis name", "-d", "secret details")
    listed(ready, "-u", "max")
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT usernames, details::text FROM audit_log WHERE action = 'list' "
            "ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert row is not None
    assert row[0] == ["max"]
    assert "Secret" not in row[1] and "details" not in row[1]
