"""Hetzner's request budget: a bucket of `limit` requests that refills evenly over `period` seconds.

Every API response carries `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (UNIX time at which
the bucket is full again); an empty bucket answers 429 `rate_limit_exceeded`.
"""

from __future__ import annotations

import math
import time

from .errors import invalid_input


class RateLimiter:
    def __init__(self, limit: int = 3600, period: float = 3600.0) -> None:
        self.limit = limit
        self.period = period
        self._tokens = float(limit)
        self._updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(float(self.limit), self._tokens + (now - self._updated) * self.limit / self.period)
        self._updated = now

    def take(self) -> bool:
        """Spend one request; False when the budget is exhausted."""
        self._refill()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def headers(self) -> dict[str, str]:
        self._refill()
        missing = self.limit - self._tokens
        reset = time.time() + missing * self.period / self.limit
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(max(0, math.floor(self._tokens))),
            "RateLimit-Reset": str(math.ceil(reset)),
        }

    def configure(self, body: object) -> None:
        """Apply `{"limit": int, "period": seconds, "remaining": int}` (each optional)."""
        if not isinstance(body, dict):
            raise invalid_input({"ratelimit": ["must be an object with limit, period, remaining"]})
        unknown = set(body) - {"limit", "period", "remaining"}
        if unknown:
            raise invalid_input({key: ["unknown rate limit setting"] for key in sorted(unknown)})
        limit, period = body.get("limit", self.limit), body.get("period", self.period)
        remaining = body.get("remaining")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise invalid_input({"limit": ["must be a positive integer"]})
        if isinstance(period, bool) or not isinstance(period, int | float) or period <= 0:
            raise invalid_input({"period": ["must be a positive number of seconds"]})
        if remaining is not None and (
            isinstance(remaining, bool) or not isinstance(remaining, int) or not 0 <= remaining <= limit
        ):
            raise invalid_input({"remaining": [f"must be an integer between 0 and {limit}"]})
        self._refill()
        self.limit, self.period = limit, float(period)
        self._tokens = float(remaining) if remaining is not None else min(self._tokens, float(limit))

    def to_json(self) -> dict[str, object]:
        self._refill()
        return {"limit": self.limit, "period": self.period, "remaining": math.floor(self._tokens)}
