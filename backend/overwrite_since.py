"""Which predictions an ``--overwrite`` run has written: those of its model version created since it started.

A plain run knows a task is done when it has a prediction of this model version. An overwrite run replaces
exactly those, so it needs another record: its start time. A prediction of this version whose ``created_at``
is at or after the start was written by this run (or by its resumption) and is done; an older one is to be
replaced. So an interrupted overwrite run, resumed with ``--overwrite-since <start>``, continues where it
stopped: nothing written twice, nothing left with the old prediction.

The start comes from Label Studio's clock, never this machine's: ``created_at`` is Label Studio's time, and
a client clock a few seconds off would either keep old predictions or rewrite new ones. Label Studio's
``Date`` header has whole seconds, so the start is the second after it, and the run writes nothing until
one second after reading it: every older prediction is before the start, every one of this run after it.
"""

from __future__ import annotations

import email.utils
from datetime import datetime, timedelta, timezone
from typing import Any

# A run reads the clock, then waits this long before its first write (see the module docstring).
CLOCK_RESOLUTION_S = 1.0


def parse_timestamp(text: str) -> datetime:
    """An ISO 8601 time with its zone (``2026-11-30T22:15:05Z``, Label Studio's ``created_at``), else ValueError.

    A time without a zone is refused: whose clock it means would be a guess."""
    try:
        text = text.strip()
        # Python 3.10's parser knows "+00:00", not the "Z" Label Studio writes.
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time such as 2026-11-30T22:15:05Z") from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone: add Z (UTC), as Label Studio's times have")
    return moment


def start_from_date_header(date: str) -> str:
    """The run's start from Label Studio's ``Date`` header: the next whole second, ISO 8601 in UTC."""
    moment = email.utils.parsedate_to_datetime(date)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return format_timestamp(moment.replace(microsecond=0) + timedelta(seconds=1))


def format_timestamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + ("" if not moment.microsecond else
                                                                    f".{moment.microsecond:06d}") + "Z"


def written_since(prediction: Any, version: str, since: datetime) -> bool:
    """Whether ``prediction`` (a Label Studio prediction's JSON) is of ``version`` and created at or after
    ``since``. A ``created_at`` that is missing or unreadable counts as older: the prediction is replaced."""
    if not isinstance(prediction, dict) or prediction.get("model_version") != version:
        return False
    created = prediction.get("created_at")
    if not isinstance(created, str):
        return False
    try:
        return parse_timestamp(created) >= since
    except ValueError:
        return False
