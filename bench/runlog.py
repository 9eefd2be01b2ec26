"""Protocols of many training runs that survive interruption: every finished run is appended to a JSON-lines log
at once, and runs found there are not run again."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path


def run_logged(
    specs: list[dict], train: Callable[[dict], dict], log: Path, jobs: int, key: Callable[[dict], tuple],
    describe: Callable[[dict], str],
) -> list[dict]:  # fmt: skip
    """The runs of ``specs`` (``train(spec)`` each, ``jobs`` at once in spawned workers), reusing those in ``log``."""
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    wanted = {key(s) for s in specs}
    runs = [r for r in runs if key(r) in wanted]
    done = {key(r) for r in runs}
    todo = [s for s in specs if key(s) not in done]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(train, s) for s in todo]
        for n, future in enumerate(concurrent.futures.as_completed(futures), len(runs) + 1):
            r = future.result()  # (logged as each finishes: an interrupted protocol loses no finished run)
            runs.append(r)
            with log.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"[{n}/{len(specs)}] {describe(r)}", flush=True)
    return runs
