"""The page under load: N clients on loopback at once (gradio_client, one thread each), each one generation (a held-out
world identity, 2 steps); prints per-client latency, the queue positions the clients were told, how many were
answered, and the server process's peak memory. The page serves one generation at a time (gradio's queue).

    python benchmarks/ui_load.py [--clients 20] [--steps 2] [--model FOLDER --hypernet FOLDER]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import threading
import time

import torch


def run_load(url: str, clients: int, steps: int, method: str, identities: list[int]) -> list[dict]:
    from gradio_client import Client

    results: list[dict] = [{} for _ in range(clients)]

    def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            client = Client(url, verbose=False)
            job = client.submit(None, str(identities[i % len(identities)]), method, "a sks toy in the snow", "HM-CFG", 3, 2, 2, steps, i, 1,
                                1.0, 0.25, "", "diffusers", api_name="/_run")
            ranks = []
            while not job.done():
                status = job.status()
                if status.rank is not None:
                    ranks.append(status.rank)
                time.sleep(0.05)
            gallery, lora, images, text = job.result()
            results[i] = {"ok": bool(gallery) and bool(lora), "seconds": time.perf_counter() - t0, "max_rank": max(ranks, default=0),
                          "told_position": bool(ranks)}
        except Exception as e:  # a lost client is what this measures
            results[i] = {"ok": False, "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}", "max_rank": 0, "told_position": False}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1800)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--hypernet", action="append", default=None)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from hyperbooth.cli.ui import load_studio
    from hyperbooth.ui import build_app, serve_locally
    from hyperbooth.world.splits import identity_seeds

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads")
    studio = load_studio(args.model, args.hypernet)
    identities = list(identity_seeds("test", 8))
    app = build_app(studio, identities)
    url = serve_locally(app, studio)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    results = run_load(url, args.clients, args.steps, next(iter(studio.personalizers)), identities)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    app.close()
    answered = sum(r["ok"] for r in results)
    told = sum(r["told_position"] for r in results)
    latencies = sorted(r["seconds"] for r in results)
    print(f"| clients | answered | told their queue position | highest position | wall s | latency median / max s | peak memory MB (before: {before:.0f}) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.clients} | {answered} | {told} | {max(r['max_rank'] for r in results)} | {wall:.1f} | "
          f"{statistics.median(latencies):.1f} / {latencies[-1]:.1f} | {peak:.0f} |")
    for i, r in enumerate(results):
        if not r["ok"]:
            print(f"client {i}: {r.get('error', 'no result')}")
    return 0 if answered == args.clients else 1


if __name__ == "__main__":
    sys.exit(main())
