"""`import`: batch-import a folder of files (not written yet)."""

from __future__ import annotations
