"""Join policies of the engine in-process: the load test's mix without HTTP, side by side.

``bench/serve_load.py`` measures the whole server; this drives :class:`~service.engine.engine.Engine`
directly, so that a difference between scheduling policies can be told apart from the HTTP
layer's share of the cores. ``--clients`` threads each call ``Engine.answer`` one request after
another (a world close-up and an inspection/colour/part question, half on the base and half on
random adapters, as in the load test), against one engine whose policy is switched between runs.
Every round visits every policy, the order reversing every other round; reported are the median
throughput and the mean rows a request shared a forward pass with.

(One engine, not one per policy: each engine's worker is a long-lived thread with an OpenMP team
of its own, and with more teams than cores every parallel operator waits for its team to wake;
four engines in one process served about 115 req/s each where one serves about 200.)

A policy is ``LABEL=JOIN_RATIO,MAX_JOIN_STEPS[,MAX_BATCH_SIZE]`` (``Settings.join_ratio``,
``Settings.max_join_steps`` and ``Settings.max_batch_size``, 16 unless given); ``100,10000``
makes newcomers wait for the running batch to end, as the engine did before continuous batching,
and ``1,8,1`` serves one request at a time. ``--baseline LABEL`` adds each policy's throughput
over that one's (medians): with a batch-size-1 baseline, what batching gains when HTTP costs
nothing, the bound on what ``bench/serve_load.py`` can measure through the server.

    python bench/engine_policies.py --policy "default=1,8" --policy "at-once=0,0" --policy "one-batch=100,10000"
    python bench/engine_policies.py --policy "batched=1,8" --policy "alone=1,8,1" --baseline alone --rounds 6
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import QUESTIONS, make_adapters, request_adapter, request_number, world_images  # noqa: E402
from service.config import DEFAULT_MODEL_DIR, Settings  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.jobs import AnswerJob  # noqa: E402
from service.model.threads import run_in_own_thread  # noqa: E402

DEFAULT_MAX_BATCH = Settings.model_fields["max_batch_size"].default
POLICY_FORMAT = "LABEL=JOIN_RATIO,MAX_JOIN_STEPS[,MAX_BATCH_SIZE]"


def parse_policy(text: str) -> tuple[str, dict]:
    label, sep, values = text.partition("=")
    try:
        ratio, steps, *rest = values.split(",")
        if len(rest) > 1:
            raise ValueError
        policy = {"join_ratio": float(ratio), "max_join_steps": int(steps),
                  "max_batch_size": int(rest[0]) if rest else DEFAULT_MAX_BATCH}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {POLICY_FORMAT}, e.g. 'default=1,8' or 'alone=1,8,1'") from None
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {POLICY_FORMAT}")
    if policy["max_batch_size"] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: MAX_BATCH_SIZE must be at least 1")
    return label, policy


def client_jobs(client: int, clients: int, n: int, adapters: list[str], images: list[Image.Image],
                max_new_tokens: int) -> list[AnswerJob]:
    """Client ``client``'s ``n`` jobs, numbered as the load test's (``request_number``)."""
    jobs = []
    for k in range(n):
        i = request_number(client, k, clients)
        adapter = request_adapter(i, adapters, base=None)
        jobs.append(AnswerJob(QUESTIONS[i % len(QUESTIONS)], [images[i % len(images)]], adapter, max_new_tokens))
    return jobs


def closed_loop(engine: Engine, jobs: list[list[AnswerJob]]) -> dict:
    """Each list of ``jobs`` on its own thread, one request after another."""
    shared: list[int] = []

    def client(mine: list[AnswerJob]) -> None:
        for job in mine:
            shared.append(engine.answer(job)["timing_ms"]["batch_size"])

    threads = [threading.Thread(target=client, args=(mine,)) for mine in jobs]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"rps": len(shared) / (time.perf_counter() - started), "batch_size": statistics.mean(shared)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", type=parse_policy, action="append", required=True,
                        help=f"{POLICY_FORMAT} (repeat; MAX_BATCH_SIZE {DEFAULT_MAX_BATCH} unless given)")
    parser.add_argument("--baseline", metavar="LABEL",
                        help="also report each policy's throughput over this one's (e.g. a batch-size-1 policy)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    labels = [label for label, _ in args.policy]
    if len(set(labels)) != len(labels):
        parser.error("policy labels must differ")
    if args.baseline is not None and args.baseline not in labels:
        parser.error(f"--baseline {args.baseline!r} is not one of the policies ({', '.join(labels)})")
    logging.basicConfig(level=logging.ERROR)

    runs: dict[str, list[dict]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory() as tmp:
        # (on a thread of its own, so that this thread keeps no OpenMP team: service/model/threads.py)
        adapters = run_in_own_thread(make_adapters, args.model, Path(tmp) / "adapters", args.adapters, args.rank)
        images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in world_images(32)]
        jobs = [client_jobs(c, args.clients, args.requests_per_client, adapters, images, args.max_new_tokens) for c in range(args.clients)]
        settings = Settings(model=args.model, adapter_dir=Path(tmp) / "adapters", data_dir=Path(tmp) / "data",
                            dtype=args.dtype)
        policies = dict(args.policy)
        engine = Engine(settings)
        try:
            # Warm-up: loads the adapters, fills the feature and prefix caches, so no run pays for them.
            closed_loop(engine, jobs)
            for round_ in range(args.rounds):
                for label in labels if round_ % 2 == 0 else reversed(labels):
                    # (between runs the engine is idle; its worker reads the policy at every step)
                    engine.settings = settings.model_copy(update=policies[label])
                    runs[label].append(closed_loop(engine, jobs))
        finally:
            engine.close()

    print(f"# engine policies: {args.model.name}, {args.clients} client threads x {args.requests_per_client} requests, "
          f"{args.adapters} adapters (rank {args.rank}) + base, max_new_tokens {args.max_new_tokens}, {args.dtype}, "
          f"{args.rounds} rounds, no HTTP, {platform.machine()} {os.cpu_count()} cores\n")
    summary = {}
    for label, _ in args.policy:
        rs = runs[label]
        summary[label] = {"rps": statistics.median(r["rps"] for r in rs),
                          "batch_size": statistics.mean(r["batch_size"] for r in rs)}
    if args.baseline is not None:
        for s in summary.values():
            s["speedup"] = s["rps"] / summary[args.baseline]["rps"]
    extra = f" × {args.baseline} |" if args.baseline is not None else ""
    print(f"| policy | join ratio | max join steps | max batch | req/s (median) | rounds | rows shared per request (mean) |{extra}")
    print("|---|---:|---:|---:|---:|---|---:|" + ("---:|" if extra else ""))
    for label, policy in args.policy:
        s = summary[label]
        per_round = ", ".join(f"{r['rps']:.1f}" for r in runs[label])
        speedup = f" {s['speedup']:.2f} |" if extra else ""
        print(f"| {label} | {policy['join_ratio']:g} | {policy['max_join_steps']} | {policy['max_batch_size']} | "
              f"{s['rps']:.2f} | {per_round} | {s['batch_size']:.1f} |{speedup}")
    return summary


if __name__ == "__main__":
    main()
