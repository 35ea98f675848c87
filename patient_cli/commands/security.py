"""`rotate-key`, `verify`, `audit` and `status` (not written yet)."""

from __future__ import annotations
