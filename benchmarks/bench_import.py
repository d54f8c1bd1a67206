"""Import HH-RLHF-style transcript pairs from JSONL.gz into shards: streaming vs whole table.

Ours (``stream``): the pipeline's source path — ``import_pairs`` yields one piece per read
batch and ``ShardWriter`` writes shards of 64 prompts as they come, so memory is a batch
plus bookkeeping. Baseline (``whole``): what the runner did before sources streamed —
``read()`` builds the whole response table, then ``split_by_prompt`` reshards it. With
``--old-tree DIR`` (a ``git archive`` of a commit before streaming) a third side runs that
commit's own ``read()`` + reshard. With ``--datasets`` the earlier baseline runs too:
``datasets.load_dataset("json")`` + ``Dataset.map`` + ``to_parquet``.

All sides read the same synthetic file (multi-turn transcripts; ``--repeat-every K``
makes every K-th pair reuse an earlier prompt far back in the file, so rows arrive for
shards already written). Each side runs in its own child process, so its peak resident
memory (``ru_maxrss``) is its own, with ``--threads`` threads for Arrow and polars; sides
alternate when ``--rounds`` > 1 and the fastest round counts. Wall and CPU time are both
printed: on a shared machine CPU time compares the sides more fairly. The whole-table sides only
run up to ``--baseline-max`` pairs (they hold everything: at 5M pairs several GB on a
shared machine). Shards of the sides are compared byte for byte; the load average is
printed with the figures and the time ratio last.

    python benchmarks/bench_import.py                       # 1M pairs, both sides
    python benchmarks/bench_import.py --repeat-every 50     # 2% of pairs reuse a prompt from far back
    python benchmarks/bench_import.py --n 5000000           # 5M: ours only (whole > --baseline-max)
    python benchmarks/bench_import.py --n 200000 --datasets
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a model answer question why how river light data quickly small large explain give "
         "example number water city history music code python list sort time night").split()
SHARD_SIZE = 64


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi))).capitalize() + "."


def make_file(path: Path, n: int, repeat_every: int = 0, seed: int = 0) -> None:
    rng = random.Random(seed)
    heads: list[str] = []
    with gzip.open(path, "wt", compresslevel=1) as fh:
        for i in range(n):
            if repeat_every and i % repeat_every == repeat_every - 1 and heads:
                head = heads[rng.randrange(len(heads))]  # an earlier prompt, usually far back
            else:
                turns = [("Human", f"[{i}] " + sentence(rng, 5, 20))]
                for _ in range(rng.choice((0, 0, 1, 2))):
                    turns += [("Assistant", sentence(rng, 5, 30)), ("Human", sentence(rng, 3, 15))]
                head = "".join(f"\n\n{r}: {t}" for r, t in turns)
                if repeat_every and i % 1000 == 0:
                    heads.append(head)
            row = {"chosen": head + "\n\nAssistant: " + sentence(rng, 5, 40),
                   "rejected": head + "\n\nAssistant: " + sentence(rng, 5, 40)}
            fh.write(json.dumps(row) + "\n")


# -- the sides (each runs in a child process) ---------------------------------------------------
def stream(src: Path, out: Path) -> int:
    from prefdata.pipeline import write_stream
    from prefdata.steps.import_pairs import ImportPairs

    return write_stream(ImportPairs(path=str(src), format="hh_transcript"), out, SHARD_SIZE)


def whole(src: Path, out: Path) -> int:
    """The runner before streaming: the whole table, then ``split_by_prompt`` and a shard each."""
    from prefdata import shards
    from prefdata.steps.import_pairs import ImportPairs

    result = shards.as_output(ImportPairs(path=str(src), format="hh_transcript").read())
    parts = shards.split_by_prompt(result.table, SHARD_SIZE)
    for index, part in enumerate(parts):
        shards.write_shard(out, index, shards.Output(part, result.quarantine if index == 0 else None,
                                                     result.counts if index == 0 else {}))
    return len(parts)


def old_tree(src: Path, out: Path) -> int:
    """The same as ``whole``, with the code of ``--old-tree`` (put first on sys.path by the parent)."""
    from prefdata.pipeline import write_resharded
    from prefdata.shards import as_output
    from prefdata.steps.import_pairs import ImportPairs

    return write_resharded(as_output(ImportPairs(path=str(src), format="hh_transcript").read()), out, SHARD_SIZE)


def datasets_map(src: Path, out: Path) -> int:
    import datasets

    from prefdata.schema import pair_id, prompt_id, response_id
    from prefdata.steps.import_pairs import HH_ROLES, HH_TURN

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=str(out / "hf_cache"))

    def split(text: str) -> list[dict]:
        parts = HH_TURN.split(text)
        return [{"role": HH_ROLES[parts[k]], "content": parts[k + 1]} for k in range(1, len(parts), 2)]

    def convert(batch: dict) -> dict:
        cols = {k: [] for k in ("prompt_id", "prompt", "response_id", "response", "original_pair")}
        for good, worse in zip(batch["chosen"], batch["rejected"]):
            c, r = split(good), split(worse)
            if c[:-1] != r[:-1]:
                continue
            pid = prompt_id(c[:-1])
            ids = [response_id(pid, "original", m[-1]["content"], k) for k, m in enumerate((c, r))]
            for k, msgs in enumerate((c, r)):
                cols["prompt_id"].append(pid)
                cols["prompt"].append(c[:-1])
                cols["response_id"].append(ids[k])
                cols["response"].append(msgs[-1]["content"])
                cols["original_pair"].append(pair_id(*ids))
        return cols

    ds = ds.map(convert, batched=True, batch_size=1000, num_proc=1, remove_columns=ds.column_names)
    ds.to_parquet(str(out / "data.parquet"))
    return 1


SIDES = {"stream": stream, "whole": whole, "old-tree": old_tree, "datasets": datasets_map}
LABELS = {"stream": "ours: read_batches -> ShardWriter      ", "whole": "baseline: read() whole -> reshard      ",
          "old-tree": "old tree: read() whole -> reshard      ", "datasets": "datasets.load_dataset + Dataset.map    "}


def child(side: str, src: Path, out: Path) -> None:
    """Run one side in this process; print its seconds, shards and peak RSS as JSON."""
    out.mkdir(parents=True, exist_ok=True)
    t, cpu = time.perf_counter(), time.process_time()
    n = SIDES[side](src, out)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"seconds": seconds, "cpu": cpu, "shards": n, "peak_mib": peak}))


def run_side(side: str, src: Path, out: Path, threads: int, old: str | None) -> dict:
    env = {**os.environ, "POLARS_MAX_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "PREFDATA_BENCH_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([old] if side == "old-tree" else [str(ROOT)])}
    proc = subprocess.run([sys.executable, __file__, "--child", side, str(src), str(out)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.parquet"))
    return names == sorted(p.name for p in b.glob("*.parquet")) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="number of transcript pairs")
    ap.add_argument("--repeat-every", type=int, default=0,
                    help="every K-th pair reuses an earlier prompt from far back (0: one pair per prompt)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the sides this many times; the fastest counts")
    ap.add_argument("--threads", type=int, default=1, help="Arrow and polars threads per side")
    ap.add_argument("--baseline-max", type=int, default=1_000_000, help="run whole-table sides up to this many pairs")
    ap.add_argument("--old-tree", help="a git archive of a commit before streaming: run its read() + reshard too")
    ap.add_argument("--datasets", action="store_true", help="also run datasets.load_dataset + Dataset.map")
    ap.add_argument("--tmp", default=None, help="where the synthetic file and shards go (deleted after)")
    ap.add_argument("--child", nargs=3, metavar=("SIDE", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        threads = int(os.environ.get("PREFDATA_BENCH_THREADS", "1"))
        import pyarrow as pa

        pa.set_cpu_count(threads)
        pa.set_io_thread_count(threads)
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    sides = ["stream"]
    if args.n <= args.baseline_max:
        sides += ["whole"] + (["old-tree"] if args.old_tree else []) + (["datasets"] if args.datasets else [])
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        src = tmp / "hh.jsonl.gz"
        t = time.perf_counter()
        make_file(src, args.n, args.repeat_every)
        repeats = f"every {args.repeat_every}th pair repeats an earlier prompt" if args.repeat_every else \
            "one pair per prompt"
        print(f"pairs: {args.n:,}  file: {src.stat().st_size / 1e6:.1f} MB gzip, {repeats}  (written in "
              f"{time.perf_counter() - t:.1f}s); threads {args.threads}", flush=True)
        best: dict[str, dict] = {}
        for r in range(args.rounds):
            for side in sides:
                out = tmp / f"{side}-{r}"
                res = run_side(side, src, out, args.threads, args.old_tree)
                load = " ".join(f"{v:.2f}" for v in os.getloadavg())
                print(f"round {r}  {LABELS[side]} {res['seconds']:7.1f}s wall {res['cpu']:7.1f}s CPU  peak RSS "
                      f"{res['peak_mib']:6.0f} MiB  {res['seconds'] / args.n * 1e6:6.1f}s wall / "
                      f"{res['cpu'] / args.n * 1e6:6.1f}s CPU per 1M pairs  ({res['shards']} shards; load {load})",
                      flush=True)
                if side not in best or res["cpu"] < best[side]["cpu"]:
                    best[side] = res
        for side in sides[1:]:
            if side in ("whole", "old-tree"):
                print(f"shards of ours and {side} byte-identical: {same_files(tmp / 'stream-0', tmp / f'{side}-0')}")
        print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        for side in sides[1:]:
            print(f"ratio ({side} / ours), wall time: {best[side]['seconds'] / best['stream']['seconds']:.2f}x, "
                  f"CPU time: {best[side]['cpu'] / best['stream']['cpu']:.2f}x, "
                  f"peak RSS: {best[side]['peak_mib'] / best['stream']['peak_mib']:.2f}x")
        if len(sides) == 1:
            print(f"ours: {best['stream']['seconds'] / args.n * 1e6:.1f}s wall, {best['stream']['cpu'] / args.n * 1e6:.1f}s "
                  f"CPU per 1M pairs, peak RSS {best['stream']['peak_mib']:.0f} MiB (whole-table sides skipped "
                  "above --baseline-max)")


if __name__ == "__main__":
    main()
