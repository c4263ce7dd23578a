"""Does the `digits` preset learn? Measured, not judged by eye.

1. Start the embedded service (`diffqueue up`: web + worker processes, SQLite, a
   temp data dir) and train the `digits` preset through the real job path.
2. Sample `--per-class` images of every class with a `ddpm.sample` job.
3. Classify them with an independent classifier trained on the real digits
   (scikit-learn's SVM, about 98-99% on held-out real digits).
4. Print the class accuracy, the training img/s and the wall time; append a JSON
   line to `--out`.

    .venv/bin/python bench/digits_quality.py                 # the preset as shipped
    .venv/bin/python bench/digits_quality.py --params '{"max_steps": 500}'

The test suite runs a reduced version (tests/test_quality.py) on the tiny preset.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests
from PIL import Image

SAMPLE_STEPS = 50


def digits_classifier():
    """An SVM on scikit-learn's 8x8 digits, and its accuracy on a held-out quarter."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=0.25, random_state=0)
    held_out = SVC(gamma=0.001).fit(x_train, y_train).score(x_test, y_test)
    return SVC(gamma=0.001).fit(digits.data, digits.target), held_out


def to_digits_features(image: Image.Image) -> np.ndarray:
    """A generated image as the classifier's input: 8x8 grayscale, values 0..16."""
    small = image.convert("L").resize((8, 8), Image.BILINEAR)
    return np.asarray(small, dtype=np.float64).reshape(-1) * (16.0 / 255.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def embedded_service(data_dir: Path, torch_threads: int | None = None):
    """`diffqueue up` in a child process; yields the API base URL."""
    port = free_port()
    env = {**os.environ, "DIFFQUEUE_PROGRESS_INTERVAL_S": "2"}
    if torch_threads:
        env["DIFFQUEUE_TORCH_THREADS"] = str(torch_threads)
    log = open(data_dir / "service.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "up", "--port", str(port), "--data-dir", str(data_dir / "data")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the service did not start:\n" + (data_dir / "service.log").read_text()[-4000:])
            try:
                if requests.get(url + "/healthz", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        yield url + "/api/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_job(api: str, kind: str, params: dict, timeout_s: float = 3600) -> dict:
    resp = requests.post(f"{api}/jobs", json={"kind": kind, "params": params}, timeout=30)
    resp.raise_for_status()
    job_id = resp.json()["id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = requests.get(f"{api}/jobs/{job_id}", timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"{kind} job {job_id} {job['status']}: {job['error']}")
            return job
        time.sleep(1)
    raise TimeoutError(f"{kind} job {job_id} did not finish in {timeout_s} s")


def measure(api: str, train_params: dict, per_class: int = 10) -> dict:
    """Train, sample `per_class` images of each digit, classify them."""
    started = time.perf_counter()
    train = run_job(api, "ddpm.train", train_params)
    train_wall_s = time.perf_counter() - started
    labels = [c for c in range(10) for _ in range(per_class)]
    sample = run_job(api, "ddpm.sample", {
        "model": f"job:{train['id']}", "num_images": len(labels), "class_label": labels, "steps": SAMPLE_STEPS,
        "scheduler": "ddim", "seed": 1234, "batch_size": 100,
    })
    images = sorted((a for a in sample["artifacts"] if a["name"].startswith("images/")), key=lambda a: a["name"])
    features = np.stack([to_digits_features(Image.open(io.BytesIO(requests.get(a["url"], timeout=30).content)))
                         for a in images])
    classifier, held_out = digits_classifier()
    predicted = classifier.predict(features)
    accuracy = float((predicted == np.array(labels)).mean())
    per_digit = {str(c): float((predicted[np.array(labels) == c] == c).mean()) for c in range(10)}
    metrics = train["result"]
    return {
        "accuracy": round(accuracy, 4),
        "per_digit": per_digit,
        "classifier_held_out_accuracy": round(held_out, 4),
        "train_steps": metrics["steps"],
        "train_s": metrics["wall_time_s"],
        "train_job_wall_s": round(train_wall_s, 1),
        "train_images_per_s": metrics["images_per_s"],
        "final_loss": round(metrics["final_loss"], 4),
        "num_params": metrics["num_params"],
        "params": train["params"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--params", default="{}", help="JSON overrides for the ddpm.train params")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "digits_quality.jsonl"))
    args = parser.parse_args(argv)

    params = {"preset": args.preset, **json.loads(args.params)}
    with tempfile.TemporaryDirectory(prefix="diffqueue-bench-") as tmp, embedded_service(Path(tmp), args.threads) as api:
        result = measure(api, params, args.per_class)
    result.update({
        "bench": "digits_quality", "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "torch_threads": args.threads, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    print(f"{'preset':<10} {'steps':>6} {'train s':>8} {'img/s':>7} {'loss':>7} {'accuracy':>9} {'SVM held-out':>13}")
    print(f"{args.preset:<10} {result['train_steps']:>6} {result['train_s']:>8.1f} {result['train_images_per_s']:>7.1f} "
          f"{result['final_loss']:>7.4f} {result['accuracy']:>9.1%} {result['classifier_held_out_accuracy']:>13.1%}")
    print("per digit: " + "  ".join(f"{d}:{v:.0%}" for d, v in result["per_digit"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
