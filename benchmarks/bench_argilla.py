"""Push N pairs to Argilla batched vs one record per request, in one run; records/s of both.

Pushes go through the public SDK (``Dataset.records.log``) with tenacity retries; the
pull line times reading the N records back with their responses (``fetch_annotations``).

Starts the local dev server (``prefdata argilla serve``'s machinery) in a temporary data
dir unless ``--url`` names a running one (then ARGILLA_API_KEY must be set). Each mode
pushes into its own fresh dataset. The last line is the batched / single ratio.

    python benchmarks/bench_argilla.py            # 5,000 pairs, batches of 500
    python benchmarks/bench_argilla.py --n 1000 --batch-size 200
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time

import pyarrow as pa

from prefdata.schema import PAIR, conform


def synthetic_pairs(n: int) -> pa.Table:
    words = "the a model answer question helpful honest short long clear because first then".split()
    rows = []
    for i in range(n):
        text = " ".join(words[(i * 7 + k) % len(words)] for k in range(40))
        rows.append({
            "pair_id": f"bench-{i:06d}", "prompt_id": f"bench-q{i:06d}",
            "prompt": [{"role": "user", "content": f"Prompt {i}: {text[:120]}"}],
            "chosen": [{"role": "assistant", "content": f"Chosen {i}. {text}"}],
            "rejected": [{"role": "assistant", "content": f"Rejected {i}. {text[::-1]}"}],
            "chosen_id": f"c{i}", "rejected_id": f"r{i}", "score_chosen": 1.0, "score_rejected": 0.5,
            "margin": 0.5, "pair_strategy": "best_vs_random", "label_source": "ai",
            "strength": 0.3, "flip_prob": (i % 100) / 100,
        })
    return conform(pa.Table.from_pylist(rows), PAIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="pairs per mode")
    parser.add_argument("--batch-size", type=int, default=500, help="records per request in batched mode")
    parser.add_argument("--url", help="a running Argilla server (default: start a local dev server)")
    args = parser.parse_args(argv)

    from prefdata.argilla import DatasetConfig, PushConfig, connect, fetch_annotations, push
    from prefdata.argilla_dev import server

    data_dir = None
    if args.url:
        url, key = args.url, os.environ.get("ARGILLA_API_KEY")
    else:
        data_dir = tempfile.mkdtemp(prefix="bench-argilla-")
        key = "bench." + secrets.token_urlsafe(24)
        os.environ["ARGILLA_API_KEY"] = key
        start = time.perf_counter()
        url = server.serve(data_dir, port=0).url
        print(f"dev server up in {time.perf_counter() - start:.1f} s at {url} "
              f"(server venv built in {server.venv_install_seconds()} s, cached)")
    try:
        client = connect(url, key)
        pairs = synthetic_pairs(args.n)
        suffix = secrets.token_hex(3)
        print(f"pushing {args.n} pairs per mode; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs")
        results = {}
        for mode, batch_size in (("batched", args.batch_size), ("single", 1)):
            cfg = PushConfig(dataset=f"bench-{mode}-{suffix}", batch_size=batch_size)
            result = push(pairs, cfg, client=client)
            assert result.created == args.n, result
            results[mode] = result
            print(f"{mode:8s} batch_size={batch_size:<4d} {result.batches:5d} requests  "
                  f"{result.seconds:7.1f} s  {result.records_per_second:8.1f} records/s")
        again = push(pairs, PushConfig(dataset=f"bench-batched-{suffix}", batch_size=args.batch_size), client=client)
        print(f"re-push  {again.created} created, {again.already_present} already present, {again.seconds:.1f} s")
        start = time.perf_counter()
        annotations = fetch_annotations(DatasetConfig(dataset=f"bench-batched-{suffix}"), client)
        seconds = time.perf_counter() - start
        print(f"pull     {annotations.num_rows} records read back in {seconds:.1f} s "
              f"({annotations.num_rows / seconds:.0f} records/s)")
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        ratio = results["batched"].records_per_second / results["single"].records_per_second
        print(f"ratio batched/single: {ratio:.1f}x")
    finally:
        if data_dir is not None:
            server.stop(data_dir)
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
