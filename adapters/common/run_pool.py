"""Run independent training runs side by side: one worker process per core, one torch thread each.

Runs of different seeds and rows share nothing, so on a machine with C cores, C single-threaded runs
at once use every core without the large slowdown of oversubscribed intra-op threads (two torch
threads on a busy second core wait on each other at every operation).  Workers are *spawned*, not
forked (a forked torch with live OpenMP threads can hang), and report each finished epoch through a
queue that drives the parent's progress bar.  Each run is seeded by the runner itself, so a run
gives the same numbers in a worker as in the parent process (tested).

What one task is, and how it runs, belongs to the upstream: ``run_tasks`` takes a ``worker``, a
module-level function ``worker(task, on_epoch) -> result`` (it must be picklable, to reach a spawned
process), so a kept model can be analysed where it was trained and only numbers come back.
"""
from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Dict, Sequence

Worker = Callable[[Any, Callable[[int], None]], Any]


def default_jobs(threads: int, device: str, num_tasks: int) -> int:
    """Workers to use when the user does not say: one per ``threads`` cores on CPU, one on a GPU."""
    if device == "cuda" or threads <= 0:
        return 1
    return max(1, min(num_tasks, (os.cpu_count() or 1) // threads))


_progress: Any = None  # the worker's end of the progress queue


def _init_worker(progress: Any, threads: int) -> None:
    global _progress
    _progress = progress
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _work(index: int, worker: Worker, task: Any) -> Any:
    return worker(task, lambda _e: _progress.put(index))


def run_tasks(
    tasks: Sequence[Any],
    worker: Worker,
    *,
    jobs: int,
    threads: int,
    on_epoch: Callable[[int], None],
    on_done: Callable[[int, Any], None],
) -> None:
    """Run ``tasks`` on ``jobs`` workers (in this process when ``jobs`` is 1), longest first as given.

    ``on_epoch(i)`` is called in this process for each finished epoch of task ``i``, ``on_done(i,
    result)`` when task ``i`` finishes.  A failing run stops the rest (queued tasks are cancelled,
    running ones finish) and its exception is raised here; results already delivered stay delivered.
    """
    if jobs <= 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            on_done(i, worker(task, lambda _e, i=i: on_epoch(i)))
        return
    ctx = multiprocessing.get_context("spawn")
    progress = ctx.Queue()

    def drain(timeout: float) -> None:
        try:
            on_epoch(progress.get(timeout=timeout))
            while True:
                on_epoch(progress.get_nowait())
        except queue_mod.Empty:
            pass

    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx, initializer=_init_worker,
                             initargs=(progress, threads)) as pool:
        futures: Dict[Future, int] = {pool.submit(_work, i, worker, t): i for i, t in enumerate(tasks)}
        pending = set(futures)
        try:
            while pending:
                drain(0.5)
                done, pending = wait(pending, timeout=0, return_when=FIRST_COMPLETED)
                for fut in done:
                    result = fut.result()  # re-raises a worker's exception
                    drain(0.0)
                    on_done(futures[fut], result)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
