"""Prometheus text-format metrics, with no dependency: counters and histograms the server updates."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def render(self, name: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        cumulative += self.counts[-1]
        lines += [f'{name}_bucket{{le="+Inf"}} {cumulative}', f"{name}_sum {self.total:.6f}", f"{name}_count {cumulative}"]
        return lines


class Metrics:
    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.time_to_first_token = Histogram()
        self.inter_token_latency = Histogram()
        self._gauges = gauges

    def count_request(self, status: int) -> None:
        with self._lock:
            self.requests[str(status)] += 1

    def count_tokens(self, prompt: int, generated: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.time_to_first_token.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        with self._lock:
            self.inter_token_latency.observe(seconds)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP phi4_requests_total HTTP requests by status code.", "# TYPE phi4_requests_total counter"]
            lines += [f'phi4_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += ["# TYPE phi4_prompt_tokens_total counter", f"phi4_prompt_tokens_total {self.prompt_tokens}",
                      "# TYPE phi4_generation_tokens_total counter",
                      f"phi4_generation_tokens_total {self.generation_tokens}"]
            for name, (help_text, read) in self._gauges.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {read():g}"]
            lines += ["# TYPE phi4_time_to_first_token_seconds histogram"]
            lines += self.time_to_first_token.render("phi4_time_to_first_token_seconds")
            lines += ["# TYPE phi4_inter_token_latency_seconds histogram"]
            lines += self.inter_token_latency.render("phi4_inter_token_latency_seconds")
        return "\n".join(lines) + "\n"
