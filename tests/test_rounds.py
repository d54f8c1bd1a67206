"""On-policy rounds: errors before work, the two recipes end to end on a tiny Llama, and
kill -9 (for real: the process group is SIGKILLed) in round 0's sampling and round 1's
training, then a rerun whose final model and tables equal an uninterrupted run's."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from prefdata.recipe import Recipe, RecipeError
from prefdata.rounds import RoundsError, RoundsRun, win_rate

ROOT = Path(__file__).resolve().parents[1]
EVAL = {"path": str(ROOT / "pipelines/data/onpolicy_eval_prompts.jsonl"), "limit": 2}


def tiny_recipe(tmp_path: Path, name: str, model: str, **rounds) -> Path:
    """pipelines/<name>.yaml at test scale: 2 rounds of 2 fresh prompts, 2 samples, 3 steps."""
    data = yaml.safe_load((ROOT / "pipelines" / f"{name}.yaml").read_text())
    data["workdir"] = "work"  # relative: run_cli runs in the recipe's folder, so two folders compare equal
    data["output"] = "out/data.parquet"
    data["shard_size"] = 1
    data["rounds"].update({"policy": model, "prompts_per_round": 2, **rounds})
    data["eval_prompts"] = dict(EVAL)
    steps = {s["step"]: s for s in data["steps"]}
    steps["load_prompts"]["path"] = str(ROOT / steps["load_prompts"]["path"])
    steps["sample"].update(n=2, max_new_tokens=8)
    steps["score_cdr"]["strong"] = model
    steps["train"].update(max_steps=3, save_every=1, eval_fraction=0.5, batch_size=1, max_length=128)
    path = tmp_path / f"{name}.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(recipe: Path, env: dict | None = None, timeout: float = 900):
    """``prefdata run`` in its own process group (a kill hook SIGKILLs the whole group)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "prefdata.cli", "run", recipe.name, "--in-process", "--no-progress"],
                            cwd=recipe.parent, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.time()
    while proc.poll() is None:
        if time.time() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("prefdata run did not finish in time")
        time.sleep(0.02)
    out = proc.communicate()[0]
    return proc.returncode, out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def round_tables(work: Path) -> dict:
    """Every finished step folder's rows (the folders' names are their fingerprints)."""
    out = {}
    for folder in sorted(work.iterdir()):
        shards = sorted(folder.glob("shard-*.parquet"))
        if shards and folder.name.split("-")[0] in ("sample", "score_cdr", "build_pairs", "train"):
            rows = [pq.read_table(s).drop_columns([c for c in ("seconds",) if c in pq.read_table(s).column_names])
                    .to_pylist() for s in shards]
            out[folder.name] = rows
    return out


def models(work: Path) -> dict:
    return {p.parent.parent.name: sha(p) for p in work.glob("train-*/model/model.safetensors")}


# -- bad input: errors before any work -------------------------------------------------------
def test_policy_outside_rounds_is_refused_naming_the_step(tmp_path, tiny_llama):
    data = yaml.safe_load(tiny_recipe(tmp_path, "iterative_dpo", tiny_llama).read_text())
    del data["rounds"], data["eval_prompts"]
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=r"steps\[1\] \(sample\): model: policy .* rounds"):
        Recipe.load(path).build()


@pytest.mark.parametrize("change, message", [
    ({"count": 0}, "count must be >= 1"),
    ({"prompts_per_round": 25}, "fresh needs count x prompts_per_round = 2 x 25"),
    ({"early_stopping": {"metric": "loss"}}, "early_stopping"),
])
def test_bad_rounds_settings_fail_before_work(tmp_path, tiny_llama, change, message):
    data = yaml.safe_load(tiny_recipe(tmp_path, "iterative_dpo", tiny_llama, **change).read_text())
    data["workdir"] = str(tmp_path / "work")
    with pytest.raises(RoundsError, match=message):
        RoundsRun("r.yaml", data).check()
    assert not (tmp_path / "work").exists()


def test_eval_prompts_overlapping_training_prompts_fail_before_work(tmp_path, tiny_llama):
    data = yaml.safe_load(tiny_recipe(tmp_path, "iterative_dpo", tiny_llama).read_text())
    data["eval_prompts"] = {"path": data["steps"][0]["path"], "limit": 3}  # the pool's first prompts
    data["workdir"] = str(tmp_path / "work")
    with pytest.raises(RoundsError, match="eval_prompts: 3 held-out prompt"):
        RoundsRun("r.yaml", data).check()
    assert not (tmp_path / "work").exists()


def test_sppo_without_win_prob_names_the_train_step(tmp_path, tiny_llama):
    data = yaml.safe_load(tiny_recipe(tmp_path, "sppo", tiny_llama).read_text())
    data["steps"] = [s for s in data["steps"] if s["step"] != "win_rates"]
    for s in data["steps"]:
        if s["step"] == "build_lists":
            s["score"] = "score_cdr"
    with pytest.raises(RoundsError, match=r"steps\[4\] \(train\): loss: sppo reads each response's win_prob"):
        RoundsRun("r.yaml", data).check()
    data = yaml.safe_load(tiny_recipe(tmp_path, "sppo", tiny_llama).read_text())
    data["steps"][4]["score"] = "score_cdr"  # win_rates runs, but the lists rank by another score
    with pytest.raises(RoundsError, match=r"train\): loss: sppo needs .* score: win_prob in the build_lists"):
        RoundsRun("r.yaml", data).check()


def test_train_step_must_train_the_policy(tmp_path, tiny_llama):
    data = yaml.safe_load(tiny_recipe(tmp_path, "iterative_dpo", tiny_llama).read_text())
    data["steps"][-1]["model"] = tiny_llama
    with pytest.raises(RoundsError, match=r"steps\[4\] \(train\): model must be 'policy'"):
        RoundsRun("r.yaml", data).check()


def test_win_rate_counts_ties_half():
    import polars as pl

    new = pl.DataFrame({"prompt_id": ["a", "a", "b"], "sample_index": [0, 1, 0], "score_x": [1.0, 0.0, 2.0]})
    old = pl.DataFrame({"prompt_id": ["a", "a", "b"], "sample_index": [0, 1, 0], "score_x": [0.0, 0.0, 3.0]})
    assert win_rate(new, old, "score_x") == pytest.approx((1 + 0.5 + 0) / 3)


# -- end to end ------------------------------------------------------------------------------
@pytest.mark.slow
def test_iterative_dpo_kill_in_round0_sampling_and_round1_training_then_resume(tmp_path, tiny_llama):
    """The uninterrupted run is the reference; the killed one must end with the same bytes."""
    clean = tiny_recipe(tmp_path / "clean", "iterative_dpo", tiny_llama)
    code, out = run_cli(clean)
    assert code == 0, out
    work = tmp_path / "clean" / "work"
    report = [json.loads(line) for line in (work / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in report] == [0, 1]
    assert report[1]["policy_in"] == report[0]["policy_out"]  # round 1 samples with round 0's model
    assert report[0]["policy_in"] == tiny_llama and report[0]["policy_out"].startswith("work/train-")
    for r in report:
        assert 0.0 <= r["win_rate_vs_previous"] <= 1.0 and 0.0 <= r["win_rate_vs_round0"] <= 1.0
        assert r["mean_response_chars"] > 0 and r["train_steps"] == 3
        assert "eval_chosen_logp_change" in r and "eval_rejected_logp_change" in r
    assert report[0]["win_rate_vs_previous"] == report[0]["win_rate_vs_round0"]  # round 0: previous = round 0
    assert "win vs prev" in out and "win vs r0" in out  # the printed table
    card = (tmp_path / "clean" / "out" / "README.md").read_text()
    assert "plots/rounds_win_rate_vs_previous.png" in card
    assert (tmp_path / "clean" / "out" / "plots" / "rounds_mean_response_chars.png").exists()
    assert (work / "rounds_win_rate_vs_round0.png").stat().st_size > 1000
    assert len(models(work)) == 2 and len(set(models(work).values())) == 2
    # round 1's sample step is another computation than round 0's (the policy's content hash)
    assert len(list(work.glob("sample-*"))) >= 2

    killed = tiny_recipe(tmp_path / "killed", "iterative_dpo", tiny_llama)
    kwork = tmp_path / "killed" / "work"

    # killed inside round 0's sampling, after its first shard: at a known point (the process
    # kills its own group, as kill -9 would), not by polling for files from here, which under
    # load could land after the last shard
    code, out = run_cli(killed, env={"PREFDATA_TEST_KILL_SAMPLE": "0:1"})
    assert code == -signal.SIGKILL, out
    sample_dirs = list(kwork.glob("sample-*"))
    assert len(sample_dirs) == 1 and not (sample_dirs[0] / "_SUCCESS.json").exists()
    assert [p.name for p in sample_dirs[0].glob("shard-*.parquet")] == ["shard-00000.parquet"]

    code, out = run_cli(killed, env={"PREFDATA_TEST_KILL_TRAIN": "1:2"})
    assert code == -signal.SIGKILL, out
    round1 = [d for d in kwork.glob("train-*") if not (d / "model" / "model.safetensors").exists()]
    assert len(round1) == 1 and (round1[0] / "model" / "checkpoints" / "step-0000001").is_dir()

    code, out = run_cli(killed)
    assert code == 0, out
    (tmp_path / "resumed.log").write_text(out)
    assert "resumed from" in out and "at step 1" in out, "\n".join(out.splitlines()[-60:])
    assert models(kwork) == models(work)
    assert round_tables(kwork) == round_tables(work)
    kreport = [json.loads(line) for line in (kwork / "rounds.jsonl").read_text().splitlines()]
    for a, b in zip(kreport, report):
        for key in ("win_rate_vs_previous", "win_rate_vs_round0", "mean_response_chars", "eval_chosen_logp_change"):
            assert a[key] == b[key], key
    assert pq.read_table(tmp_path / "killed/out/data.parquet").equals(pq.read_table(tmp_path / "clean/out/data.parquet"))


@pytest.mark.slow
def test_sppo_recipe_runs_two_rounds_on_win_probabilities(tmp_path, tiny_llama):
    recipe = tiny_recipe(tmp_path, "sppo", tiny_llama)
    code, out = run_cli(recipe)
    assert code == 0, out
    work = tmp_path / "work"
    report = [json.loads(line) for line in (work / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in report] == [0, 1] and all(r["train_steps"] == 3 for r in report)
    win = pq.read_table(next(work.glob("win_rates-*/shard-00000.parquet"))).to_pydict()
    by_prompt: dict = {}
    for pid, p in zip(win["prompt_id"], win["win_prob"]):
        by_prompt.setdefault(pid, []).append(p)
    for probs in by_prompt.values():  # two samples: P and 1 - P
        assert len(probs) == 2 and probs[0] + probs[1] == pytest.approx(1.0)
    lists = pq.read_table(tmp_path / "out" / "data.parquet").to_pydict()
    assert all(0.0 <= s <= 1.0 for row in lists["scores"] for s in row)
    log = [json.loads(line) for line in next(work.glob("train-*/model/log.jsonl")).read_text().splitlines()]
    assert any("loss" in r and r["loss"] > 0 for r in log)


def test_train_step_curry_iterations_chain_models_and_references(tmp_path, tiny_llama):
    """Curry-DPO: iteration 1 starts from iteration 0's model, which is also its reference."""
    import polars as pl

    from prefdata.steps.train import Train

    def msg(role, text):
        return [{"role": role, "content": text}]

    rows = [(f"p{i}", f"Question {i}?", f"Answer {i} is good.", f"bad {i}", i % 2) for i in range(4)]
    table = pl.DataFrame({"prompt_id": [r[0] for r in rows], "prompt": [msg("user", r[1]) for r in rows],
                          "chosen": [msg("assistant", r[2]) for r in rows],
                          "rejected": [msg("assistant", r[3]) for r in rows], "iteration": [r[4] for r in rows]})
    step = Train(model=tiny_llama, iterations=True, max_steps=1, batch_size=2, eval_fraction=0.0,
                 max_length=64, save_every=0)
    step.bind_output_dir(tmp_path)
    out = step.process(table.lazy())
    assert out.num_rows == 4 and step.metadata["iterations"] == 2
    first = json.loads((tmp_path / "iteration-0" / "run.json").read_text())
    last = json.loads((tmp_path / "model" / "run.json").read_text())
    assert first["config"]["model"] == tiny_llama and first["config"]["reference"] is None
    assert last["config"]["model"] == str(tmp_path / "iteration-0") == last["config"]["reference"]
    assert pq.read_table(tmp_path / "data" / "iteration-1.parquet").column("iteration").to_pylist() == [1, 1]
    assert sha(tmp_path / "model" / "model.safetensors") != sha(tmp_path / "iteration-0" / "model.safetensors")


# -- early stopping across rounds -------------------------------------------------------------
def expected_rounds(values: list[float], patience: int, mode: str) -> tuple[int | None, list[int]]:
    """The rule written out on the rounds that ran: (the number of rounds after which it
    stops, or None; the best round so far after each round)."""
    best, bests = None, []
    for k, v in enumerate(values):
        if best is None or (v > values[best] if mode == "max" else v < values[best]):
            best = k
        bests.append(best)
        if k - best >= patience:
            return k + 1, bests
    return None, bests


@pytest.mark.slow
def test_rounds_early_stopping_resolves_policy_to_the_best_round_and_stops(tmp_path, tiny_llama):
    """Three rounds, patience 1, on the trainer's eval margin (a continuous value), once with
    mode max and once with mode min in one workdir (rounds 0 and 1 are shared): whichever way
    round 1 moves the margin, one mode stops after round 1 — round 2 never runs and the final
    policy is round 0's model — and the other goes on to round 2 from round 1's model."""
    runs = {}
    for mode in ("max", "min"):
        path = tiny_recipe(tmp_path, "iterative_dpo", tiny_llama, count=3,
                           early_stopping={"metric": "eval_margin", "patience": 1, "mode": mode})
        data = yaml.safe_load(path.read_text())
        data.update(workdir=str(tmp_path / "work"), output=str(tmp_path / f"out-{mode}/data.parquet"))
        run = RoundsRun(str(path), data, in_process=True, progress=False)
        rows = run.run()
        saved = [json.loads(line) for line in (tmp_path / "work" / "rounds.jsonl").read_text().splitlines()]
        runs[mode] = (rows, saved, run.final_policy)
    values = [r["eval_margin"] for r in runs["max"][0]][:2]
    assert values == [r["eval_margin"] for r in runs["min"][0]][:2]  # rounds 0 and 1: the same computation
    if values[0] == values[1]:
        pytest.skip("round 1 left the eval margin exactly unchanged: neither mode improves (not expected)")
    for mode, (rows, saved, final) in runs.items():
        all_values = [r["eval_margin"] for r in rows]
        stop, bests = expected_rounds(all_values, 1, mode)
        assert stop == len(rows) if len(rows) < 3 else stop in (None, 3), (mode, all_values)
        for k in range(1, len(rows)):  # round k samples and trains from the best model so far
            assert rows[k]["policy_in"] == rows[bests[k - 1]]["policy_out"]
        best = bests[len(rows) - 1]
        assert final == rows[best]["policy_out"] and (Path(final) / "model.safetensors").exists()
        assert [r["best"] for r in saved] == [r["round"] == best for r in rows]
    stopped = [m for m, (rows, _, _) in runs.items() if len(rows) == 2]
    went_on = [m for m, (rows, _, _) in runs.items() if len(rows) == 3]
    assert len(stopped) == 1 and len(went_on) == 1
    rows, _, final = runs[stopped[0]]
    assert final == rows[0]["policy_out"]  # round 1 did worse: 'policy' is round 0's model
    rows, _, final = runs[went_on[0]]
    assert rows[2]["policy_in"] == rows[1]["policy_out"]


# -- pairwise-judge win rates in the report -----------------------------------------------------
class JudgeServer:
    """A real chat-completions server on 127.0.0.1 that judges pairs in the text format:
    model ``longer`` prefers the longer response ([[C]] when equally long) — a fair judge,
    both orders agree —, model ``first`` always answers [[A]] (pure position bias)."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.asked: list[tuple[str, str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                a = user.split("[Response A]\n", 1)[1].split("\n\n[Response B]\n", 1)[0]
                b = user.split("\n\n[Response B]\n", 1)[1].rsplit("\n\nFirst explain", 1)[0]
                server.asked.append((body["model"], a, b))
                if body["model"] == "first":
                    verdict = "A"
                else:
                    verdict = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                       "role": "assistant", "content": f"Compared lengths. [[{verdict}]]"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()


def by_length(new, old) -> float:
    """What the fair judge's win rate must be: longer wins, equal length ½."""
    import polars as pl

    keys = ["prompt_id", "sample_index"]
    both = new.select(*keys, pl.col("response").str.len_chars().alias("a")).join(
        old.select(*keys, pl.col("response").str.len_chars().alias("b")), on=keys)
    return float(both.select(((pl.col("a") > pl.col("b")) + 0.5 * (pl.col("a") == pl.col("b"))).mean()).item())


@pytest.mark.slow
def test_rounds_report_pairwise_judge_win_rates_in_both_orders(tmp_path, tiny_llama, monkeypatch):
    pytest.importorskip("openai", reason="the api backend needs openai (pip install 'prefdata[api]')")
    from prefdata.models import clear_cache
    from prefdata.rounds import format_report

    server = JudgeServer()
    monkeypatch.setenv("PREFDATA_TEST_JUDGE_KEY", "sk-local")
    judge = {"model": "longer", "backend": "api", "structured": "off", "max_new_tokens": 16,
             "model_options": {"base_url": server.url, "api_key_env": "PREFDATA_TEST_JUDGE_KEY", "max_retries": 0}}
    path = tiny_recipe(tmp_path, "iterative_dpo", tiny_llama)
    data = yaml.safe_load(path.read_text())
    data.update(workdir=str(tmp_path / "work"), output=str(tmp_path / "out/data.parquet"))
    data["eval_prompts"] = {**EVAL, "judge": judge}
    try:
        run = RoundsRun(str(path), data, in_process=True, progress=False)
        rows = run.run()
        asked = len(server.asked)
        for r in rows:
            new, prev, first = (run.eval_responses(m) for m in (r["policy_out"], r["policy_in"], tiny_llama))
            assert r["judge_win_rate_vs_previous"] == pytest.approx(by_length(new, prev))
            assert r["judge_win_rate_vs_round0"] == pytest.approx(by_length(new, first))
            assert r["judge_agreement_vs_previous"] == 1.0 and r["judge_missing_vs_previous"] == 0
            assert r["eval_judge"] == "longer" and "win_rate_vs_previous" in r  # the scorer's rates stay
        # every comparison was asked in both orders: (x, y) and (y, x)
        pairs = [(a, b) for _, a, b in server.asked]
        assert sorted(pairs) == sorted((b, a) for a, b in pairs)
        # comparison sets: round 0's (previous = round 0: one set, judged once) + round 1's two;
        # each 2 prompts x 2 samples, asked in 2 orders
        assert asked == 3 * 2 * 2 * 2
        assert "judge vs prev" in format_report(rows)
        assert (tmp_path / "work" / "rounds_judge_win_rate_vs_round0.png").stat().st_size > 1000
        # cached like any step: a rerun asks nothing, and leaves the card (same inputs) as it is
        card = tmp_path / "out" / "README.md"
        made = card.stat().st_mtime_ns
        assert [r["judge_win_rate_vs_round0"] for r in run.run()] == [r["judge_win_rate_vs_round0"] for r in rows]
        assert len(server.asked) == asked and card.stat().st_mtime_ns == made
        assert "judge_win_rate_vs_previous" in card.read_text()
        # a judge that always says A: every comparison's orders disagree -> a tie, win rate exactly 1/2
        data["eval_prompts"]["judge"] = {**judge, "model": "first"}
        biased = RoundsRun(str(path), data, in_process=True, progress=False)
        tables = [run.eval_responses(rows[1][k]) for k in ("policy_out", "policy_in")]
        assert biased.judge_win_rate(*tables) == {"win_rate": 0.5, "agreement": 0.0, "missing": 0}
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        clear_cache()


def test_a_bad_eval_judge_fails_before_work(tmp_path, tiny_llama):
    data = yaml.safe_load(tiny_recipe(tmp_path, "iterative_dpo", tiny_llama).read_text())
    data["workdir"] = str(tmp_path / "work")
    data["eval_prompts"]["judge"] = {"model": tiny_llama, "max_attempts": 0}
    with pytest.raises(RoundsError, match=r"eval_prompts: judge: .*max_attempts must be at least 1"):
        RoundsRun("r.yaml", data).check()
    data["eval_prompts"]["judge"] = "gpt-4o"
    with pytest.raises(RoundsError, match=r"eval_prompts: judge: must be a mapping of judge_pairwise options"):
        RoundsRun("r.yaml", data).check()
    assert not (tmp_path / "work").exists()


def test_card_digest_ignores_timings_and_follows_the_report(tmp_path):
    from prefdata.io import write_parquet
    from prefdata.rounds import card_digest

    import pyarrow as pa

    data = write_parquet(pa.table({"x": [1, 2]}), tmp_path / "d.parquet")
    summary = {"info": {"recipe": {"name": "r"}}, "finished": "2026-01-01T00:00:00",
               "steps": [{"step": "sample", "seconds": 3.0, "shards_cached": 0, "rows_out": 4}],
               "rounds": [{"round": 0, "win_rate_vs_previous": 0.5, "seconds": {"round": 9.0}}]}
    digest = card_digest(data, summary)
    later = json.loads(json.dumps(summary))
    later["finished"], later["steps"][0]["seconds"], later["steps"][0]["shards_cached"] = "2027", 0.1, 1
    later["rounds"][0]["seconds"]["round"] = 0.5
    assert card_digest(data, later) == digest  # a cached rerun: the same card
    later["rounds"][0]["win_rate_vs_previous"] = 0.75
    assert card_digest(data, later) != digest
    write_parquet(pa.table({"x": [1, 3]}), data)
    assert card_digest(data, summary) != digest


# -- the policy folder a round hands to the sample step (transformers, vLLM) -------------------
def trained_policy(tmp_path: Path, model: str) -> Path:
    """A round's policy folder as the train step writes it: one real training step."""
    import polars as pl

    from prefdata.steps.train import Train, model_dir

    def msg(role, text):
        return [{"role": role, "content": text}]

    table = pl.DataFrame({"prompt_id": ["a", "b"], "prompt": [msg("user", "Name a colour."), msg("user", "Say hi.")],
                          "chosen": [msg("assistant", "Blue."), msg("assistant", "Hi!")],
                          "rejected": [msg("assistant", "No."), msg("assistant", "...")]})
    step = Train(model=model, max_steps=1, batch_size=2, eval_fraction=0.0, max_length=64, save_every=1)
    step.bind_output_dir(tmp_path)
    step.process(table.lazy())
    return model_dir(tmp_path)


PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}]]


def test_the_policy_folder_is_a_plain_model_folder_the_sample_step_loads(tmp_path, tiny_llama):
    """What any backend reads: one top-level weights file (checkpoints and optimizer states
    live in checkpoints/, which loaders do not glob), config, tokenizer with its chat template."""
    from transformers import AutoTokenizer

    from prefdata.models import Sampling, load_model
    from prefdata.models.hub import resolve
    from prefdata.models.identity import identity_files

    folder = trained_policy(tmp_path, tiny_llama)
    weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    assert weights == ["model.safetensors"]
    assert all(p.parent.name.startswith("step-") for p in folder.rglob("*.safetensors") if p.parent != folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and tok.eos_token_id is not None
    assert resolve(str(folder)) == str(folder)  # a folder goes to from_pretrained / vllm.LLM as is
    assert "model.safetensors" in [p.name for p in identity_files(folder)] and "log.jsonl" not in [
        p.name for p in identity_files(folder)]  # the fingerprint covers the weights, not the logs
    lm = load_model(str(folder), backend="transformers", device="cpu")
    replies = lm.generate(PROMPTS, 1, Sampling(temperature=0.0, max_new_tokens=4, seed=0))
    assert [len(r) for r in replies] == [1, 1]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (pip install 'prefdata[vllm]')")
def test_vllm_samples_from_a_round_policy_folder(tmp_path):
    """On a GPU: the sample step with backend vllm loads the folder a round trained (plain
    safetensors + tokenizer, fp32 as the trainer saves it) and scores like transformers."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("the vLLM backend needs a CUDA GPU")
    import pyarrow as pa

    from prefdata.models import load_model
    from prefdata.models.hub import SMOLLM2
    from prefdata.steps.sample import Sample

    folder = trained_policy(tmp_path, SMOLLM2)
    step = Sample(model=str(folder), backend="vllm", dtype="float32", n=2, max_new_tokens=12, temperature=0.8,
                  model_options={"gpu_memory_utilization": 0.3})
    table = pa.table({"prompt_id": ["p0", "p1"], "prompt": PROMPTS})
    step.setup()
    out = step.process(table).to_pylist()
    assert len(out) == 4 and all(r["generator"] == str(folder) for r in out)
    assert all(isinstance(r["response"], str) for r in out)
    assert step.process(table).to_pylist() == out  # seeded per draw
    reference = load_model(str(folder), backend="transformers", device="cuda", dtype="float32")
    responses = [out[0]["response"] or "Paris.", out[2]["response"] or "7"]
    for a, b in zip(step.model.logprobs(PROMPTS, responses), reference.logprobs(PROMPTS, responses)):
        assert a.n_tokens == b.n_tokens and a.sum == pytest.approx(b.sum, abs=0.05)
