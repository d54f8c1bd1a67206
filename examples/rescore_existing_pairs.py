"""Bring your own pairs: import HH-RLHF-style transcripts, re-score them with CDR,
estimate how often the original labels disagree (flip rate ε), and export for TRL.

    python examples/rescore_existing_pairs.py --data pipelines/data/hh_sample.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq

from prefdata.pipeline import Pipeline
from prefdata.steps.build import BuildPairs
from prefdata.steps.cdr import ScoreCDR
from prefdata.steps.export import Export
from prefdata.steps.import_pairs import ImportPairs

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(ROOT / "pipelines/data/hh_sample.jsonl"))
    parser.add_argument("--out", default="out/rescored")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    out = Path(args.out)

    pipeline = Pipeline(
        [
            ImportPairs(path=args.data, format="hh_transcript", limit=args.limit),
            ScoreCDR(name="cdr"),
            BuildPairs(score="score_original", strategy="original"),
            Export(format="trl_conversational"),
        ],
        workdir=out / "work", output=out / "pairs.parquet", shard_size=8,
    )
    pairs = pipeline.run()
    print(pipeline.summary_text())
    table = pq.read_table(out / "pairs.parquet")
    agree = sum(c > r for c, r in zip(table["score_cdr_chosen"].to_pylist(), table["score_cdr_rejected"].to_pylist()))
    print(f"{pairs.num_rows} pairs; CDR agrees with the original label on {agree} of them")


if __name__ == "__main__":
    main()
