"""Finding the files an import takes: a sorted, streaming walk of one folder.

Yields one item per candidate file, in name order, depth first, holding only
the current folder's sorted names per level (never the whole tree), and marks
files that cannot be imported (FIFOs, devices, broken or looping symlinks,
names that are not UTF-8) so the importer reports them and goes on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from patient_cli.errors import UsageError
from patient_cli.inputs import check_username

# Kinds of folder entries, from the d_type that scandir already has (no stat).
_FILE, _DIR, _LINK, _OTHER = range(4)

# Failure codes (the "code" of a failure in the import summary).
NOT_REGULAR = "not_regular_file"
SYMLINK_LOOP = "symlink_loop"
DANGLING_SYMLINK = "dangling_symlink"
BAD_NAME = "invalid_name"
NO_USERNAME_FOLDER = "no_username_folder"
BAD_USERNAME = "invalid_username"
UNREADABLE_FOLDER = "unreadable_folder"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class ScanOptions:
    """Which files under `root` an import takes."""

    root: Path
    recursive: bool = True
    include_hidden: bool = False
    globs: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    username_from_dir: bool = False


@dataclass(frozen=True)
class Problem:
    """Why a file found by the scan cannot be imported."""

    code: str
    error: str


@dataclass(frozen=True)
class ScanItem:
    """A file to import (or to report, when `problem` is set)."""

    path: str  # root joined with rel, as the OS names it (may hold surrogates)
    rel: str  # relative to root, "/"-separated
    user_rel: str  # relative to the user's folder with --username-from-dir, else rel
    username: str | None  # the first-level folder with --username-from-dir
    problem: Problem | None = None

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]

    @property
    def shown(self) -> str:
        """The path as printed in results."""
        return display_path(self.path)


def check_root(root: Path) -> None:
    """The folder to import must exist and be a folder (exit 2 otherwise)."""
    try:
        info = root.stat()
    except FileNotFoundError:
        raise UsageError(f"folder not found: {root}") from None
    except OSError as exc:
        raise UsageError(f"cannot open {root}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"not a folder: {root}")


def display_path(path: str) -> str:
    """A path safe to print and to put in JSON: bytes that are not UTF-8 are
    shown as backslash escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def scan(options: ScanOptions) -> Iterator[ScanItem]:
    """Every candidate file under the root, in sorted order, depth first."""
    check_root(options.root)
    root = str(options.root)
    # A stack of (folder path, rel prefix, depth, username, its remaining entries):
    # memory grows with depth and folder width, not with the number of files.
    stack: list[tuple[str, str, int, str | None, Iterator[tuple[str, int]]]] = [
        (root, "", 0, None, iter(_list_folder(root)))
    ]
    user_problem: Problem | None = None
    while stack:
        folder, prefix, depth, username, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name, kind = entry
        if name.startswith(".") and not options.include_hidden:
            continue
        rel = prefix + name
        path = os.path.join(folder, name)
        if _matches(options.excludes, rel, name):
            continue
        if kind == _LINK:
            kind, link_problem = _follow_link(path)
            if kind == _DIR:
                continue  # symlinks to folders are not followed
        else:
            link_problem = None
        if kind == _DIR:
            if depth == 0 and options.username_from_dir:
                user_problem = _username_problem(name)
                items = _list_folder_or_problem(path, rel)
                if isinstance(items, ScanItem):
                    yield items
                    continue
                stack.append((path, rel + "/", 1, name, iter(items)))
            elif options.recursive:
                items = _list_folder_or_problem(path, rel)
                if isinstance(items, ScanItem):
                    yield items
                    continue
                stack.append((path, rel + "/", depth + 1, username, iter(items)))
            continue
        if options.globs and not _matches(options.globs, rel, name):
            continue
        user_rel = rel.split("/", 1)[1] if username is not None else rel
        problem = link_problem
        if problem is None and options.username_from_dir and depth == 0:
            problem = Problem(NO_USERNAME_FOLDER, "file is not in a username folder")
        if problem is None and kind == _OTHER:
            problem = Problem(NOT_REGULAR, "not a regular file (FIFO, device or socket)")
        if problem is None and not _is_utf8(rel):
            problem = Problem(BAD_NAME, "file or folder name is not valid UTF-8")
        if problem is None and username is not None:
            problem = user_problem
        yield ScanItem(path, rel, user_rel, username, problem)


def count_files(options: ScanOptions) -> tuple[int, int]:
    """How many files the scan yields and their total size (for a progress bar)."""
    files = size = 0
    for item in scan(options):
        files += 1
        if item.problem is None:
            with contextlib.suppress(OSError):
                size += os.stat(item.path).st_size
    return files, size


def _list_folder(path: str) -> list[tuple[str, int]]:
    entries = []
    with os.scandir(path) as found:
        for entry in found:
            entries.append((entry.name, _kind(entry)))
    entries.sort()
    return entries


def _list_folder_or_problem(path: str, rel: str) -> list[tuple[str, int]] | ScanItem:
    try:
        return _list_folder(path)
    except OSError as exc:
        problem = Problem(UNREADABLE_FOLDER, f"cannot read folder: {exc.strerror}")
        return ScanItem(path, rel, rel, None, problem)


def _kind(entry: os.DirEntry[str]) -> int:
    try:
        if entry.is_symlink():
            return _LINK
        if entry.is_dir(follow_symlinks=False):
            return _DIR
        if entry.is_file(follow_symlinks=False):
            return _FILE
    except OSError:
        return _OTHER
    return _OTHER


def _follow_link(path: str) -> tuple[int, Problem | None]:
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return _FILE, Problem(SYMLINK_LOOP, "symlink loop")
        if exc.errno == errno.ENOENT:
            return _FILE, Problem(DANGLING_SYMLINK, "symlink to a missing file")
        return _FILE, Problem(UNREADABLE, f"cannot follow symlink: {exc.strerror}")
    if stat.S_ISDIR(info.st_mode):
        return _DIR, None
    if stat.S_ISREG(info.st_mode):
        return _FILE, None
    return _OTHER, None


def _matches(patterns: tuple[str, ...], rel: str, name: str) -> bool:
    return any(fnmatchcase(rel, p) or fnmatchcase(name, p) for p in patterns)


def _is_utf8(text: str) -> bool:
    # os functions decode undecodable bytes as lone surrogates.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _username_problem(name: str) -> Problem | None:
    try:
        check_username(name)
    except UsageError as exc:
        return Problem(BAD_USERNAME, f"folder is not a valid username: {exc.message}")
    return None
