"""`python -m worker`: run a Celery worker with settings from the environment."""
from __future__ import annotations

import argparse
import logging

from shared.config import Settings
from worker.celery_app import make_celery


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--queues", default="gpu")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args()
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = make_celery(Settings.from_env())
    # One job at a time per process: a GPU job owns its device. The solo pool runs the
    # job in this process, so the job sees the worker's shutdown signal directly.
    pool = "solo" if args.concurrency == 1 else "prefork"
    app.worker_main([
        "worker", "--queues", args.queues, "--concurrency", str(args.concurrency), "--pool", pool,
        "--loglevel", args.loglevel, "--without-gossip", "--without-mingle",
    ])


if __name__ == "__main__":
    main()
