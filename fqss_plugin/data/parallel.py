"""Run independent generation tasks over a small process pool, in order, with a progress bar.

Workers are started with ``spawn``, never ``fork``: a process forked after torch has
run a parallel op inherits a GNU OpenMP thread pool it cannot use, and the first
parallel op in the child blocks forever (a test suite that ran torch before
generating data hangs; with ``OMP_NUM_THREADS=1`` it does not, which hides it).
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], tasks: list[T], jobs: int, desc: str, progress: bool) -> list[R]:
    """``[fn(t) for t in tasks]`` in task order over ``jobs`` processes (inline when ``jobs == 1``).

    Results come back in task order whatever ``jobs`` is, so outputs that depend
    on them (metadata rows) are identical for any number of workers.
    """
    results: list[R] = []
    with tqdm(total=len(tasks), desc=desc, disable=not progress, unit="item") as bar:
        if jobs == 1:
            for result in map(fn, tasks):
                results.append(result)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                for result in pool.map(fn, tasks, chunksize=max(1, min(32, len(tasks) // (4 * jobs)))):
                    results.append(result)
                    bar.update()
    return results
