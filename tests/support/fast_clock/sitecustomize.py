"""A process clock that is off, for tests: put this folder first on PYTHONPATH and
set FAST_CLOCK_SECONDS, and `datetime.now()` of that process runs so many seconds
ahead (behind, if negative), as on a machine whose clock has drifted.

Python runs `sitecustomize` at start, before any module binds `datetime`, so every
`from datetime import datetime` in the process gets the shifted class. (libfaketime
cannot stand in: Python 3.11's timed waits hang under it.)
"""

from __future__ import annotations

import datetime
import os
from typing import Any

_OFFSET = datetime.timedelta(seconds=float(os.environ.get("FAST_CLOCK_SECONDS", "0")))
_real_datetime = datetime.datetime


class _ShiftedDatetime(_real_datetime):
    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return _real_datetime.now(tz) + _OFFSET

    @classmethod
    def utcnow(cls) -> Any:
        return _real_datetime.now(datetime.UTC).replace(tzinfo=None) + _OFFSET


datetime.datetime = _ShiftedDatetime  # type: ignore[misc]
