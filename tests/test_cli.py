"""The prefdata command: --version, steps, run --dry-run / --force, gc, -v before train.

Runs go through ``main([...])`` as the console script does, on a real recipe (load_prompts,
then sample on the tiny Llama), and the assertions read what a user reads.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from prefdata import __version__
from prefdata.cli import main
from prefdata.steps import STEPS

PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "Name a fruit.", "Name a tree."]


@pytest.fixture
def recipe(tmp_path, tiny_llama) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cli", "workdir": str(tmp_path / "work"), "shard_size": 2, "card": False,
        "steps": [
            {"step": "load_prompts", "path": str(data)},
            {"step": "sample", "model": tiny_llama, "n": 2, "max_new_tokens": 3, "backend": "transformers",
             "device": "cpu", "dtype": "float32"},
        ],
    }, sort_keys=False))
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"prefdata {__version__}"


def test_steps_lists_every_step_with_columns_and_options(capsys):
    rc, out, _ = cli(capsys, "steps")
    assert rc == 0
    for name in STEPS:
        assert re.search(rf"^{name}\b", out, re.M), name
    block = out.split("\nsample (")[1].split("\n\n")[0]
    assert block.startswith("map step")
    assert "  reads:   prompt_id, prompt" in block
    assert "  writes:  response_id, response, generator, sample_index, sampling" in block  # (then any newer)
    assert re.search(r"^    n: int = 4\b", block, re.M)
    assert re.search(r"^    device: str = 'auto' +auto \| cpu \| cuda$", block, re.M)
    assert "``" not in out  # no reStructuredText markup
    build = out.split("\nbuild_pairs (")[1].split("\n\n")[0]
    assert re.search(r"strategy: str = 'auto' +auto \| best_vs_random", build)
    assert "path: str = (required)" in out.split("load_prompts (")[1].split("\n\n")[0]


def test_steps_unknown_name_is_an_error(capsys):
    rc, _, err = cli(capsys, "steps", "sampel")
    assert rc == 2 and "unknown step(s) ['sampel']" in err and "sample" in err


def test_dry_run_says_what_and_why_then_run_and_force(capsys, recipe, tmp_path):
    rc, out, _ = cli(capsys, "run", str(recipe), "--dry-run")
    assert rc == 0
    assert re.search(r"^load_prompts +[0-9a-f]{16} +compute$", out, re.M)
    assert "not run before in this workdir" in out
    assert re.search(r"loads .*tiny-llama-0\S* \(lm: transformers, cpu, float32\)", out)
    assert out.strip().endswith("2 of 2 step(s) would compute; nothing was run")
    assert not (tmp_path / "work").exists()  # nothing was run

    rc, out, _ = cli(capsys, "run", str(recipe), "--in-process", "--no-progress", "--limit", "3")
    assert rc == 0 and re.search(r"^sample .* prompts_computed=3, prompts_reused=0$", out, re.M)
    assert re.search(r"^load_prompts .* limit=3", out, re.M)

    rc, out, _ = cli(capsys, "run", str(recipe), "--dry-run", "--limit", "3")
    assert re.search(r"^sample +[0-9a-f]{16} +cached$", out, re.M)
    assert out.strip().endswith("0 of 2 step(s) would compute; nothing was run")

    rc, out, _ = cli(capsys, "run", str(recipe), "--dry-run", "--limit", "3", "--set", "sample.top_p=0.5")
    assert "config change: top_p 0.95 -> 0.5" in out
    assert re.search(r"^load_prompts +[0-9a-f]{16} +cached$", out, re.M)

    rc, out, _ = cli(capsys, "run", str(recipe), "--dry-run")
    assert "config change: limit 3 -> None" in out
    assert re.search(r"^sample +[0-9a-f]{16} +partly cached$", out, re.M)
    assert "prompt store: 3 prompt(s) done with this config and models; only the others compute" in out

    rc, out, _ = cli(capsys, "run", str(recipe), "--in-process", "--no-progress", "--limit", "3", "--force", "sample")
    assert rc == 0 and re.search(r"^sample .* 0/2 .* prompts_computed=3, prompts_reused=0$", out, re.M)
    assert re.search(r"^load_prompts +[0-9a-f]{16} .* 2/2 ", out, re.M)  # before the forced step: cached

    rc, _, err = cli(capsys, "run", str(recipe), "--force", "score")
    assert rc == 2 and "no step 'score' to force" in err and "1: sample" in err


def test_gc_removes_only_unreachable_folders(capsys, recipe, tmp_path):
    assert cli(capsys, "run", str(recipe), "--in-process", "--no-progress", "--limit", "2")[0] == 0
    assert cli(capsys, "run", str(recipe), "--in-process", "--no-progress")[0] == 0
    work = tmp_path / "work"
    (work / "notes.txt").write_text("mine")
    before = sorted(p.name for p in work.iterdir())
    rc, out, _ = cli(capsys, "gc", str(work), "--recipe", str(recipe), "--dry-run")
    assert rc == 0
    listed = re.findall(r"^would remove (\S+)  \((\d+(?:\.\d)? (?:B|KiB|MiB))\)$", out, re.M)
    assert sorted(name.split("-")[0] for name, _ in listed) == ["load_prompts", "sample"]  # the --limit 2 run's
    assert sorted(p.name for p in work.iterdir()) == before  # dry run: nothing removed
    rc, out, _ = cli(capsys, "gc", str(work), "--recipe", str(recipe))
    assert "removed 2 folder(s)" in out
    left = sorted(p.name for p in work.iterdir())
    assert "notes.txt" in left and "summary.json" in left and "_prompts" in left
    assert not any(name in left for name, _ in listed)
    # what the recipe uses is still complete: a rerun computes nothing
    rc, out, _ = cli(capsys, "run", str(recipe), "--dry-run")
    assert out.strip().endswith("0 of 2 step(s) would compute; nothing was run")


def test_verbose_before_train_configures_logging(capsys, tmp_path, monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    rc = main(["-v", "train", "--data", str(tmp_path / "missing.parquet"), "--model", "smollm2-135m-instruct",
               "--loss", "dpo", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "missing.parquet" in err and "unrecognized arguments" not in err
    assert "prefdata train: error: prefdata train:" not in err
    assert root.level == logging.DEBUG and root.handlers  # configured like run, -v honoured


def test_train_errors_have_one_prefix(capsys, tmp_path):
    rc = main(["train", "--data", str(tmp_path / "p.parquet"), "--model", "m", "--output", str(tmp_path / "o"),
               "--set", "lr=abc"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err == "prefdata train: error: command line: option 'lr': expected a number, got 'abc'"


def test_inspect_folder_with_different_schemas_and_a_bad_file(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "out"
    folder.mkdir()
    pq.write_table(pa.table({"pair_id": ["a", "b"], "score_chosen": [1.0, 3.0]}), folder / "pairs.parquet")
    pq.write_table(pa.table({"pair_id": ["a"], "label_source": ["human"], "annotators": [["ann1"]]}),
                   folder / "pairs_human.parquet")
    rc, out, err = cli(capsys, "inspect", str(folder))
    assert rc == 0, err
    assert out.startswith(f"{folder}: 2 files with 2 different schemas; each described on its own")
    assert f"{folder / 'pairs.parquet'}: 2 rows in 1 file(s)" in out
    assert f"{folder / 'pairs_human.parquet'}: 1 rows in 1 file(s)" in out
    assert "score_chosen: n=2 mean=2 std=1.414 min=1 max=3" in out
    assert "  label_source: string" in out
    # one schema: still one table
    rc, out, _ = cli(capsys, "inspect", str(folder / "pairs.parquet"))
    assert out.startswith(f"{folder / 'pairs.parquet'}: 2 rows in 1 file(s)")
    (folder / "notes.parquet").write_text("not parquet")
    rc, _, err = cli(capsys, "inspect", str(folder))
    assert rc == 2 and f"{folder / 'notes.parquet'}: not a parquet file" in err
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    rc, _, err = cli(capsys, "inspect", str(data))
    assert rc == 2 and f"{data}: not a parquet file" in err


def test_verbose_after_the_command(capsys, tmp_path):
    rc, _, err = cli(capsys, "inspect", str(tmp_path / "nothing"))
    assert rc == 2 and err.strip() == f"prefdata: error: {tmp_path / 'nothing'}: no such file or folder"
    with pytest.raises(FileNotFoundError):  # -v: the full traceback
        main(["inspect", str(tmp_path / "nothing"), "-v"])


def test_train_help_lists_set_keys_with_defaults(capsys):
    """``prefdata train --help`` shows every TrainConfig field that has a default, with it."""
    import dataclasses

    from prefdata.train.config import TrainConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            assert f"  {f.name} = {f.default!r}" in out, f.name
    assert "--set keys" in out
