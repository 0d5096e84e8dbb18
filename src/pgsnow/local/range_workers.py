"""The extractor's range queue delivered as the template's event source mapping does: batch size 1,
up to ``workers`` invocations at once (``ScalingConfig.MaximumConcurrency``).

Each worker is an ``SqsDispatcher`` of its own on the queue, polling on its own thread, so up to
``workers`` extractor invocations run concurrently in this process, each on its own PostgreSQL
connection (``Runtime.postgres`` keeps one per thread). A message whose invocation fails stays
on the queue and comes back after the visibility timeout, then goes to the dead-letter queue,
as deployed.
"""

from __future__ import annotations

import threading
from typing import Any

from pgsnow.local.aws import LocalAws
from pgsnow.local.dispatcher import DispatchStats, Handler, SqsDispatcher

EXTRACTOR_TIMEOUT_S = 900  # the template's extractor Timeout


class RangeWorkers:
    """Up to ``workers`` concurrent extractor invocations, one range message each."""

    def __init__(
        self,
        aws: LocalAws,
        queue_url: str,
        handler: Handler,
        *,
        workers: int,
        wait_seconds: int = 1,
        function_timeout_s: int = EXTRACTOR_TIMEOUT_S,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.dispatchers = [
            SqsDispatcher(
                aws,
                queue_url,
                handler,
                batch_size=1,
                wait_seconds=wait_seconds,
                function_timeout_s=function_timeout_s,
                report_batch_item_failures=False,
                function_name="pgsnow-extractor",
                memory_limit_in_mb=2048,
            )
            for _ in range(workers)
        ]

    def run_until_idle(self, max_seconds: float = 600) -> DispatchStats:
        """Every worker polls until the queue is empty and nothing is in flight; returns the totals."""
        results: list[DispatchStats] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def work(dispatcher: SqsDispatcher) -> None:
            try:
                stats = dispatcher.run_until_idle(max_seconds=max_seconds)
            except BaseException as exc:  # re-raised in the caller's thread
                with lock:
                    errors.append(exc)
                return
            with lock:
                results.append(stats)

        threads = [
            threading.Thread(target=work, args=(d,), name=f"range-worker-{n}")
            for n, d in enumerate(self.dispatchers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        total = DispatchStats()
        for stats in results:
            total.add(stats)
        return total

    def start(self) -> None:
        for dispatcher in self.dispatchers:
            dispatcher.start()

    def stop(self) -> None:
        for dispatcher in self.dispatchers:
            dispatcher.stop()


def range_workers_for(stack: Any, handler: Handler, **options: Any) -> RangeWorkers:
    """The range workers of a running local stack (``stack.env``'s EXTRACT_MAX_WORKERS of them)."""
    workers = int(stack.env.get("EXTRACT_MAX_WORKERS", "1"))
    return RangeWorkers(stack.aws, stack.resources.range_queue_url, handler, workers=workers, **options)
