"""In-process rate-limit counters for ``memory://`` that forget a key once its window has passed.

limits' own MemoryStorage keeps an entry for every key it has ever counted and, while requests
keep coming, rescans all of them on a new thread every 10 ms. The per-session resume limit
makes a key per session, so a worker's rescans grow with every session it has served: at
100,000 sessions one rescan takes about 0.3 s of CPU, and the rescans run back to back. This
storage prunes a key's window when the key is counted and drops idle keys in one pass at most
every ``SWEEP_EVERY_SECONDS``, on the request that finds the pass due, so its work follows the
keys counted within a window, not every key ever seen (docs/decisions.md, "Rate limits").

It registers itself for the ``memory`` scheme in place of limits' class, so
``RATELIMIT_STORAGE_URI=memory://`` (the default) uses it; ``rate_limits`` gives it to
flask-limiter's in-memory fallback as well. It supports the moving window, the strategy this
app uses, and the counters of the fixed window.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

from limits.storage.base import MovingWindowSupport, Storage

SWEEP_EVERY_SECONDS = 10.0


@dataclass
class _Window:
    """A key's moving window: when each counted request came (oldest first), for ``expiry`` s."""

    expiry: float
    times: list[float] = field(default_factory=list)


@dataclass
class _Counter:
    """A fixed-window counter and the time it expires."""

    count: int
    expires_at: float


class MemoryCounters(Storage, MovingWindowSupport):
    """Rate-limit counters held in this process."""

    # limits declares this an instance attribute, and reads it when the class is made.
    STORAGE_SCHEME = ["memory"]  # noqa: RUF012

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        sweep_every_seconds: float = SWEEP_EVERY_SECONDS,
        **_: object,
    ):
        self._windows: dict[str, _Window] = {}
        self._counters: dict[str, _Counter] = {}
        self._lock = threading.Lock()
        self._sweep_every = float(sweep_every_seconds)
        self._next_sweep = time.monotonic() + self._sweep_every
        super().__init__(uri, wrap_exceptions=wrap_exceptions)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Count ``amount`` requests in the key's window unless that would pass ``limit``."""
        if amount > limit:
            return False
        now = time.time()
        with self._lock:
            self._sweep_if_due()
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(float(expiry))
            times = window.times
            del times[: bisect.bisect_right(times, now - expiry)]
            if len(times) + amount > limit:
                return False
            times.extend([now] * amount)
            return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """When the key's window began (its oldest counted request) and how many it holds."""
        now = time.time()
        with self._lock:
            window = self._windows.get(key)
            times = window.times if window is not None else []
            current = times[bisect.bisect_right(times, now - expiry) :]
        return (current[0], len(current)) if current else (now, 0)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add ``amount`` to a fixed-window counter, starting it for ``expiry`` s if it is new."""
        now = time.time()
        with self._lock:
            self._sweep_if_due()
            counter = self._counters.get(key)
            if counter is None or counter.expires_at <= now:
                counter = self._counters[key] = _Counter(0, now + expiry)
            counter.count += amount
            return counter.count

    def get(self, key: str) -> int:
        """A fixed-window counter's value (0 once it has expired)."""
        counter = self._counters.get(key)
        return counter.count if counter is not None and counter.expires_at > time.time() else 0

    def get_expiry(self, key: str) -> float:
        """When a fixed-window counter expires (now if there is none)."""
        counter = self._counters.get(key)
        return counter.expires_at if counter is not None else time.time()

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        """Forget every key; how many there were."""
        with self._lock:
            count = len(self._windows) + len(self._counters)
            self._windows.clear()
            self._counters.clear()
        return count

    def clear(self, key: str) -> None:
        with self._lock:
            self._windows.pop(key, None)
            self._counters.pop(key, None)

    def key_count(self) -> int:
        """How many keys are held."""
        return len(self._windows) + len(self._counters)

    def _sweep_if_due(self) -> None:
        """Drop keys whose last count has left its window; the caller holds the lock."""
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self._sweep_every
        now = time.time()
        for key, window in list(self._windows.items()):
            if not window.times or window.times[-1] <= now - window.expiry:
                del self._windows[key]
        for key, counter in list(self._counters.items()):
            if counter.expires_at <= now:
                del self._counters[key]
