"""`make demo`: the whole story on the offline default base and the vendored FLIP data.

1. train a small sec_str LoRA adapter (a few minutes on 2 CPU cores; reused if already published),
   evaluate it on NEW364 and publish it into adapters/;
2. start the service (embedded Ray Serve, gRPC and HTTP/JSON, a bearer token made for the demo) on
   that registry;
3. call it through the client's command line and over HTTP, print a few Prometheus lines, stop.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request

from pathlib import Path

from modeling import bundle as bundles
from modeling import registry as store
from modeling.base import load_base

REGISTRY = "adapters"
NAME = "sec_str-r16"
GRPC_PORT = int(os.environ.get("DEMO_GRPC_PORT", 9000))
METRICS_PORT = int(os.environ.get("DEMO_METRICS_PORT", 9100))
HTTP_PORT = int(os.environ.get("DEMO_HTTP_PORT", 8000))
# Human ubiquitin and a designed three-helix bundle (alpha3D), to read the H/E/C line against.
SEQUENCES = ["MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG",
             "MGSWAEFKQRLAAIKTRLQALGGSEAELAAFEKEIAAFESELQAYKGKGNPEVEALRKEAAAIRDELQAYRHN"]


def train_or_reuse() -> None:
    base = load_base(None)
    published = store.versions(REGISTRY, NAME)
    if published:
        manifest = bundles.read_manifest(Path(REGISTRY) / NAME / str(published[-1]))
        if manifest["base"]["fingerprint"] == base.fingerprint:
            print(f"[1/3] reusing {REGISTRY}/{NAME}/{published[-1]} "
                  f"(test q3 {manifest['metrics']['test']['q3']:.3f}); `rm -r {REGISTRY}/{NAME}` to retrain")
            return
    from training import fit
    args = ["--task", "sec_str", "--rank", "16", "--name", NAME, "--registry", REGISTRY,
            "--max-steps", "150", "--batch-size", "8", "--max-length", "256",
            "trainer.limit_val_batches=40", "early_stopping.enabled=false", "score_val=false"]
    print("[1/3] python -m training.fit " + " ".join(args), flush=True)
    if fit.main(args):
        sys.exit(1)


def serve_and_call() -> None:
    from serving import serve as service
    token_file = Path(tempfile.mkdtemp()) / "token"
    token = secrets.token_urlsafe(24)
    token_file.write_text(token)
    token_file.chmod(0o600)
    print(f"[2/3] starting the service: gRPC 127.0.0.1:{GRPC_PORT}, HTTP 127.0.0.1:{HTTP_PORT}, metrics :{METRICS_PORT}; "
          f"bearer token in {token_file}", flush=True)
    service.start({"registry": REGISTRY, "auth_token_file": str(token_file)}, GRPC_PORT, METRICS_PORT, num_cpus=0.5,
                  ray_cpus=2, http_port=HTTP_PORT, token=token)
    try:
        command = [sys.executable, "-m", "serving.client", "--target", f"127.0.0.1:{GRPC_PORT}",
                   "--token-file", str(token_file)]
        print("[3/3] python -m serving.client list", flush=True)
        subprocess.run(command + ["list"], check=True)
        predict = ["predict", "--adapter", NAME] + [a for s in SEQUENCES for a in ("--sequence", s)]
        print(f"\n$ python -m serving.client predict --adapter {NAME} --sequence ... --sequence ...", flush=True)
        subprocess.run(command + predict, check=True)
        body = json.dumps({"adapter": NAME, "sequences": SEQUENCES[:1]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{HTTP_PORT}/v1/predict", data=body,
                                         headers={"Authorization": f"Bearer {token}"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        print(f"\n$ curl -s 127.0.0.1:{HTTP_PORT}/v1/predict -H 'Authorization: Bearer ...' "
              f"-d '{{\"adapter\": \"{NAME}\", \"sequences\": [\"MQIFVKTL...\"]}}'")
        print(f"  adapter {answer['adapter']}, labels {answer['predictions'][0]['labels'][:40]}...")
        deadline = time.monotonic() + 15  # Ray's metrics agent exports every couple of seconds
        while True:
            text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
            if "ray_esm_requests_total{" in text or time.monotonic() > deadline:
                break
            time.sleep(1)
        print("\nA few metric lines (full set: curl http://127.0.0.1:%d/metrics):" % METRICS_PORT)
        for line in text.splitlines():
            if line.startswith(("ray_esm_requests_total", "ray_esm_adapters_resident", "ray_esm_batch_size_count")):
                print("  " + line.split("{")[0] + "{" + ",".join(
                    p for p in line.split("{")[1].split("}")[0].split(",")
                    if p.split("=")[0] in ("adapter", "code", "tier")) + "} " + line.rsplit(" ", 1)[1])
    finally:
        service.stop()
        print("\nservice stopped.")


if __name__ == "__main__":
    train_or_reuse()
    serve_and_call()
