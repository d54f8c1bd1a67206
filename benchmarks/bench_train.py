"""Training speed and peak memory: prefdata's DPO vs TRL's DPOTrainer, side by side.

Same model (SmolLM2-135M-Instruct), same 64 multi-turn pairs (prompts about as long as
the two responses together), batch size 4, max length 512, fp32 on CPU. TRL runs twice:
with its defaults (a reference model forward every step) and with
``precompute_ref_log_probs=True``. Each variant runs in its own process so that its peak
RSS is its own; steps/s is measured after ``--warmup`` steps. Reference precompute time
(TRL's and ours) is reported apart. Before training, each variant computes the DPO loss
and the policy log-probs of the same first 4 pairs: they must agree.

    pip install trl          # benchmark-only dependency
    python benchmarks/bench_train.py [--pairs 64] [--warmup 1] [--steps 4] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
BATCH, MAX_LENGTH, BETA, LR = 4, 512, 0.1, 1e-6
WORDS = ("the a of to and in is it that for on with as was be by this are or from at an but not "
         "we you they have has can will would should model data time value system result method "
         "train test error number first second next last small large fast slow good better best "
         "reason answer question problem step list order rule case point part idea word line code "
         "because while when where which there then than more most some many each other also only").split()


def words_to_tokens(tok, rng, n_tokens: int) -> str:
    """A pseudo-sentence of about ``n_tokens`` tokens."""
    text = ""
    while len(tok(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += " ".join(rng.choice(WORDS) for _ in range(8)) + ". "
    return text.strip()


def make_pairs(path: Path, n: int, seed: int = 0) -> None:
    """Multi-turn prompts of ~200 tokens, chosen and rejected of ~100 tokens each."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from prefdata.models.hub import resolve
    from prefdata.schema import MESSAGES

    tok = AutoTokenizer.from_pretrained(resolve(MODEL))
    rng = random.Random(seed)
    rows = {"pair_id": [], "prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        prompt = [{"role": "user", "content": words_to_tokens(tok, rng, rng.randint(60, 80))},
                  {"role": "assistant", "content": words_to_tokens(tok, rng, rng.randint(40, 60))},
                  {"role": "user", "content": words_to_tokens(tok, rng, rng.randint(50, 70))}]
        rows["pair_id"].append(f"pair-{i}")
        rows["prompt"].append(prompt)
        rows["chosen"].append([{"role": "assistant", "content": words_to_tokens(tok, rng, rng.randint(80, 120))}])
        rows["rejected"].append([{"role": "assistant", "content": words_to_tokens(tok, rng, rng.randint(80, 120))}])
    types = {"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES}
    pq.write_table(pa.table({k: pa.array(v, types.get(k)) for k, v in rows.items()}), path)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class StepClock:
    """Wall and process-CPU time at the end of every optimizer step.

    On a shared machine wall time depends on the neighbours: the fastest step (contention
    only ever adds time) and the CPU time per step are reported beside the mean.
    """

    def __init__(self):
        self.wall, self.cpu = [time.perf_counter()], [time.process_time()]

    def tick(self):
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.rss = peak_rss_gb()

    def result(self, warmup: int) -> dict:
        # ticks[0] is the start; ticks[warmup] ends the warm-up steps
        steps = len(self.wall) - 1 - warmup
        wall = self.wall[-1] - self.wall[warmup]
        cpu = self.cpu[-1] - self.cpu[warmup]
        step_walls = [b - a for a, b in zip(self.wall[warmup:], self.wall[warmup + 1:])]
        return {"steps_per_s": steps / wall, "best_step_per_s": 1 / min(step_walls),
                "cpu_s_per_step": cpu / steps, "measured_steps": steps,
                "peak_rss_at_last_step_gb": self.rss}


# ---- variants (each runs in a child process) --------------------------------------------------


def run_ours(data: str, work: str, steps: int, warmup: int) -> dict:
    import gc

    import torch

    from prefdata.train.config import config_from
    from prefdata.train.data import load_examples
    from prefdata.train.losses import dpo_loss
    from prefdata.train.packing import collate, response_logps
    from prefdata.train.trainer import load_policy, train

    cfg = config_from(dict(data=data, model=MODEL, output=f"{work}/ours", loss="dpo", beta=BETA, lr=LR,
                           batch_size=BATCH, max_length=MAX_LENGTH, max_steps=warmup + steps,
                           eval_fraction=0.0, save_every=0, device="cpu", precision="fp32",
                           ref_cache_dir=f"{work}/ref-cache", progress=False))
    # first batch: the same 4 pairs TRL scores
    model, tok = load_policy(MODEL, cfg, "cpu")
    ex = load_examples(data, tok, MAX_LENGTH)
    with torch.no_grad():
        logps, n = response_logps(model, collate([ex.row(i) for i in range(BATCH)], tok.pad_token_id), "cpu")
    loss = dpo_loss(logps[:, 0], logps[:, 1], logps[:, 0], logps[:, 1], BETA).mean().item()
    first = {"loss": loss, "logps_chosen": logps[:, 0].mean().item(), "logps_rejected": logps[:, 1].mean().item(),
             "tokens": int(n.sum().item())}
    del model
    gc.collect()

    clock = StepClock()
    summary = train(cfg, on_step=lambda record: clock.tick())
    log = [json.loads(x) for x in Path(f"{work}/ours/log.jsonl").read_text().splitlines()]
    return {**clock.result(warmup), "first_batch": first, "first_step_loss": log[0]["loss"],
            "precompute_s": summary.get("reference_seconds"), "packing": summary.get("packing"),
            "packing_check_rel_error": summary.get("packing_check_rel_error")}


def run_trl(data: str, work: str, steps: int, warmup: int, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from prefdata.models.hub import resolve

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.tick()

    path = resolve(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dataset = Dataset.from_parquet(data).select_columns(["prompt", "chosen", "rejected"])
    args = DPOConfig(output_dir=f"{work}/trl", per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                     max_length=MAX_LENGTH, max_steps=warmup + steps, learning_rate=LR, beta=BETA,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     precompute_ref_log_probs=precompute, dataloader_num_workers=0, seed=0)
    clock, timer = StepClock(), StepTimer()
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[timer])
    init_s = time.perf_counter() - t0
    # first batch: rows 0..3, scored before training
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    m = trainer._metrics["eval"]
    first = {"loss": loss, "logps_chosen": m["logps/chosen"][-1], "logps_rejected": m["logps/rejected"][-1],
             "tokens": int(batch["completion_mask"].sum().item())}
    trainer._metrics["eval"].clear()
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {**clock.result(warmup), "first_batch": first, "first_step_loss": history[0]["loss"],
            "precompute_s": init_s if precompute else None}


# ---- driver ----------------------------------------------------------------------------------


def child(variant: str, data: str, work: str, steps: int, warmup: int) -> None:
    t0 = time.perf_counter()
    if variant == "ours":
        result = run_ours(data, work, steps, warmup)
    else:
        result = run_trl(data, work, steps, warmup, precompute=variant == "trl-precompute")
    result.update(variant=variant, peak_rss_gb=peak_rss_gb(), wall_s=time.perf_counter() - t0)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="measured steps per variant")
    p.add_argument("--variants", default="trl-default,trl-precompute,ours")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    if args.child:
        child(args.child, args.data, args.work, args.steps, args.warmup)
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("this benchmark compares against TRL: pip install trl", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="bench-train-")
    data = os.path.join(work, "pairs.parquet")
    make_pairs(Path(data), args.pairs)
    results = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", variant, "--data", data, "--work", work,
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{variant} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[variant] = json.loads(lines[-1][len("RESULT "):])
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        r = results[variant]
        print(f"{variant:15s} {r['steps_per_s']:.3f} steps/s (best step {r['best_step_per_s']:.3f})  "
              f"{r['cpu_s_per_step']:.1f} CPU-s/step  "
              f"peak RSS {r['peak_rss_gb']:.2f} GB  "
              f"precompute {r['precompute_s'] or 0:.1f} s  wall {r['wall_s']:.0f} s", flush=True)
    print(f"\n{args.pairs} pairs, batch {BATCH}, max_length {MAX_LENGTH}, fp32, CPU threads={os.cpu_count()}, "
          f"{args.warmup} warmup + {args.steps} measured steps")
    print(f"{'variant':15s} {'steps/s':>8s} {'best':>6s} {'CPU-s/step':>10s} {'peak RSS GB':>12s} {'first-batch loss':>17s} "
          f"{'logp chosen':>12s} {'logp rejected':>14s} {'resp. tokens':>12s}")
    for name, r in results.items():
        f = r["first_batch"]
        print(f"{name:15s} {r['steps_per_s']:8.3f} {r['best_step_per_s']:6.3f} {r['cpu_s_per_step']:10.1f} {r['peak_rss_gb']:12.2f} "
              f"{f['loss']:17.6f} {f['logps_chosen']:12.3f} {f['logps_rejected']:14.3f} {f['tokens']:12d}")
    if "ours" in results:
        ours = results["ours"]
        for base in ("trl-default", "trl-precompute"):
            if base in results:
                b = results[base]
                d = max(abs(ours["first_batch"][k] - b["first_batch"][k])
                        for k in ("loss", "logps_chosen", "logps_rejected"))
                print(f"ours vs {base}: {ours['steps_per_s'] / b['steps_per_s']:.2f}x steps/s "
                      f"({ours['best_step_per_s'] / b['best_step_per_s']:.2f}x best step), "
                      f"{b['cpu_s_per_step'] / ours['cpu_s_per_step']:.2f}x less CPU per step, "
                      f"{ours['peak_rss_gb'] / b['peak_rss_gb']:.2f}x peak RSS, first batch max |diff| {d:.2e}")
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
