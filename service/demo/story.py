"""The whole product story over HTTP on the embedded default (``make demo``).

1. start the server (embedded demo base, a fresh adapter store and job database under ``data/``);
2. generate a labelled line-inspection dataset (ZIP upload format) and held-out images;
3. ask ``/v1/answer`` on the held-out images with the base: inspection is near chance;
4. ``POST /v1/finetune`` a ``line-inspection`` adapter and follow the job, while another thread keeps
   asking the base general questions (the server serves while it trains);
5. ask again with ``adapter=line-inspection`` and print accuracy before and after.

    python -m service.demo.story [--n-train 1500] [--n-test 120] [--epochs 8] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from service import client
from service.config import DEFAULT_MODEL_DIR
from service.world import generate_examples
from service.world.dataset import write_zip
from service.world.questions import OK_ANSWER

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (workdir / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--model", str(model), "--port", str(port),
         "--data-dir", str(workdir / "data"), "--adapter-dir", str(workdir / "adapters")],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited; see {workdir / 'server.log'}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit("the server did not become ready")


# Room for the longest inspection answer: "defect: missing_hole, top-right" is 23 tokens with the
# demo tokenizer, and EOS ends shorter answers early. A tighter cap cuts answers short and scores
# them as wrong type / location.
MAX_NEW_TOKENS = 32


def ask_one(url: str, item, adapter: str | None) -> str:
    """POST one ``(image, record)`` to ``/v1/answer``; returns the answer text."""
    image, record = item
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    body = {"instruction": record["instruction"], "images": [base64.b64encode(buf.getvalue()).decode()],
            "max_new_tokens": MAX_NEW_TOKENS, "adapter": adapter or "base"}
    r = httpx.post(url + "/v1/answer", json=body, timeout=300)
    r.raise_for_status()
    return r.json()["answer"]


def ask_all(url: str, examples, adapter: str | None) -> list[str]:
    """Ask every example, 8 requests in flight (the server batches them)."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda item: ask_one(url, item, adapter), examples))


class BackgroundTraffic:
    """Base-model questions sent one after another from a thread while the fine-tune runs.

    Shows that the server keeps answering other users during training (the base is shared).
    """

    def __init__(self, url: str, examples):
        self.url, self.examples = url, examples
        self.records: list[dict] = []
        self.answers: list[str] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BackgroundTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        k = 0
        while not self._stop.is_set():
            item = self.examples[k % len(self.examples)]
            k += 1
            try:
                answer = ask_one(self.url, item, None)
            except httpx.HTTPError:
                self.failed += 1
            else:
                self.records.append(item[1])
                self.answers.append(answer)
            self._stop.wait(0.5)

    def summary(self) -> dict:
        from service.demo.evaluate import general_metrics

        accuracy = general_metrics(self.records, self.answers)["accuracy"] if self.records else None
        return {"answered": len(self.answers), "accuracy": accuracy, "failed": self.failed}


def fmt(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def main(argv: list[str] | None = None) -> dict:
    from service.demo.evaluate import inspection_metrics

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--n-test", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="fine-tune batch size (default: the Python recipe's 32; docs/demo.md)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "data" / "demo")
    args = parser.parse_args(argv)

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    print(f"[1/5] starting the server on {args.model.name} (logs: {args.workdir / 'server.log'})")
    proc, url = start_server(args.model, args.workdir)
    try:
        print(f"[2/5] generating {args.n_train} labelled inspection images and {args.n_test} held-out ones")
        train = generate_examples(args.n_train, seed=101, kind="inspection")
        test = generate_examples(args.n_test, seed=202, kind="inspection")
        dataset = args.workdir / "line-inspection.zip"
        write_zip(dataset, train)

        print("[3/5] asking the base model")
        records = [record for _, record in test]
        before = inspection_metrics(records, ask_all(url, test, None))

        print("[4/5] fine-tuning `line-inspection` over HTTP")
        job = client.submit(url, "line-inspection", dataset, {
            "epochs": args.epochs, "rank": args.rank, "alpha": 2 * args.rank, "learning_rate": args.learning_rate,
            "batch_size": args.batch_size, "validation_split": 0.1, "seed": 0})
        general = generate_examples(8, seed=303, kind="general")
        with BackgroundTraffic(url, general) as traffic:
            job = client.follow(url, job["id"])
        if job["status"] != "succeeded":
            raise SystemExit(f"fine-tuning {job['status']}: {job.get('error')}")
        listing = httpx.get(url + "/v1/adapters/line-inspection", timeout=30).json()
        served = traffic.summary()
        print(f"      published line-inspection, live version {listing.get('live_version')}; meanwhile the server "
              f"answered {served['answered']} general questions with the base ({fmt(served['accuracy'])} right, "
              f"{served['failed']} failed)")

        print("[5/5] asking again with adapter=line-inspection")
        after = inspection_metrics(records, ask_all(url, test, "line-inspection"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    rows = [("defective / ok accuracy", "defective_accuracy"), ("defect type accuracy", "type_accuracy"),
            ("defect location accuracy", "location_accuracy"), ("exact match", "exact_match")]
    print(f"\nline-inspection on {args.n_test} held-out images ({platform.machine()}, {os.cpu_count()} cores, "
          f"train {args.n_train} images, {args.epochs} epochs, rank {args.rank}; "
          f"training took {job['metrics'].get('train_seconds')} s)\n")
    print("| metric | base | + line-inspection |")
    print("|---|---:|---:|")
    for label, key in rows:
        print(f"| {label} | {fmt(before.get(key))} | {fmt(after.get(key))} |")
    for size in ("tiny", "large"):
        b, a = before.get("by_size", {}).get(size, {}), after.get("by_size", {}).get(size, {})
        print(f"| exact match, {size} defects | {fmt(b.get('exact_match'))} | {fmt(a.get('exact_match'))} |")
    ok_share = sum(record["answer"] == OK_ANSWER for record in records) / len(records)
    print(f"\n(answering `ok` to every image would score {fmt(ok_share)} defective / ok)")
    return {"before": before, "after": after, "ok_share": ok_share, "job": job, "adapter": listing,
            "served_while_training": served}


if __name__ == "__main__":
    main()
