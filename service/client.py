"""``python -m service finetune``: upload a dataset, follow the job with a progress bar (HTTP only)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

HYPERPARAMETERS = ("method", "rank", "alpha", "epochs", "learning_rate", "batch_size", "validation_split", "seed",
                   "promote", "checkpoint_every")
TERMINAL = ("succeeded", "failed", "cancelled")


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def submit(url: str, adapter: str, dataset: Path, hyperparameters: dict, timeout: float = 600,
           api_key: str | None = None) -> dict:
    with dataset.open("rb") as f:
        r = httpx.post(f"{url}/v1/finetune", data={"adapter": adapter, **{k: str(v) for k, v in hyperparameters.items()}},
                       files={"dataset": (dataset.name, f)}, timeout=timeout, headers=_headers(api_key))
    if r.status_code != 202:
        raise SystemExit(f"refused ({r.status_code}): {_message(r)}")
    return r.json()


def follow(url: str, job_id: str, poll_s: float = 1.0, show: bool = True, api_key: str | None = None) -> dict:
    """Poll the job until it ends, drawing its step progress; returns the final job."""
    bar = None
    try:
        while True:
            response = httpx.get(f"{url}/v1/finetune/{job_id}", timeout=30, headers=_headers(api_key))
            if response.status_code != 200:
                raise SystemExit(f"cannot read job {job_id} ({response.status_code}): {_message(response)}")
            job = response.json()
            progress = job.get("progress") or {}
            if show and progress.get("total_steps"):
                if bar is None:
                    bar = tqdm(total=progress["total_steps"], desc=f"{job['adapter']} ({job_id})", unit="step")
                bar.n = progress.get("step", 0)
                loss = (job.get("metrics") or {}).get("train_loss")
                bar.set_postfix(epoch=f"{progress.get('epoch')}/{progress.get('epochs')}",
                                loss=f"{loss:.4f}" if loss is not None else "-")
                bar.refresh()
            if job["status"] in TERMINAL:
                return job
            time.sleep(poll_s)
    finally:
        if bar is not None:
            bar.close()


def _message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path, help="ZIP with data.jsonl + images, or JSONL with base64 images")
    parser.add_argument("--adapter", required=True, help="adapter name to publish a new version of")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service")
    parser.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    parser.add_argument("--api-key", default=os.environ.get("SERVICE_API_KEY"), help="admin key (env SERVICE_API_KEY)")
    for name in HYPERPARAMETERS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name)


def main(args: argparse.Namespace) -> None:
    if not args.dataset.is_file():
        raise SystemExit(f"{args.dataset}: no such file")
    hyperparameters = {k: getattr(args, k) for k in HYPERPARAMETERS if getattr(args, k) is not None}
    job = submit(args.url.rstrip("/"), args.adapter, args.dataset, hyperparameters, api_key=args.api_key)
    print(f"queued {job['id']} for adapter {job['adapter']!r} ({job['n_examples']} examples)", file=sys.stderr)
    if not args.wait:
        print(json.dumps(job, indent=2))
        return
    job = follow(args.url.rstrip("/"), job["id"], api_key=args.api_key)
    print(json.dumps({k: job[k] for k in ("id", "status", "result", "metrics", "error")}, indent=2))
    if job["status"] != "succeeded":
        raise SystemExit(1)
