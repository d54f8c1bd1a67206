"""Build a preference dataset with the Python API, then train on it — no YAML, no glue.

    python examples/build_and_train.py --limit 8 --steps 20

Everything runs on the embedded SmolLM2-135M-Instruct on CPU; swap the model names for
real ones on a GPU machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefdata.pipeline import Pipeline
from prefdata.steps.build import BuildPairs
from prefdata.steps.cdr import ScoreCDR
from prefdata.steps.load_prompts import LoadPrompts
from prefdata.steps.sample import Sample
from prefdata.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out/example", help="output folder")
    parser.add_argument("--limit", type=int, default=8, help="prompts to use")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    args = parser.parse_args()
    out = Path(args.out)

    pipeline = Pipeline(
        [
            LoadPrompts(path=str(ROOT / "pipelines/data/quickstart_prompts.jsonl"), limit=args.limit),
            Sample(n=args.n, max_new_tokens=args.max_new_tokens, temperature=0.9),
            ScoreCDR(),
            BuildPairs(strategy="best_vs_worst"),
        ],
        workdir=out / "work",
        output=out / "pairs.parquet",
        shard_size=4,
    )
    pairs = pipeline.run()
    print(pipeline.summary_text())
    print(f"{pairs.num_rows} pairs -> {out / 'pairs.parquet'}")

    result = train(TrainConfig(
        data=str(out / "pairs.parquet"), model="smollm2-135m-instruct", output=str(out / "model"),
        loss="dpo", beta=0.1, lr=5e-6, batch_size=2, max_steps=args.steps, eval_fraction=0.0,
        save_every=0, max_length=512,
    ))
    print({k: v for k, v in result.items() if isinstance(v, (int, float, str))})

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    print(f"trained model reloads: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
