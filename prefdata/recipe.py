"""Recipes: a YAML file naming the steps of a pipeline and their options.

```yaml
name: quickstart
workdir: work/quickstart
output: out/pairs.parquet
shard_size: 4
executor: local            # or {name: local, in_process: true}, ray, {name: ray, num_actors: 2}
steps:
  - step: load_prompts
    path: pipelines/data/quickstart_prompts.jsonl
  - step: sample
    n: 4
```

``--set key=value`` overrides a top-level key (``workdir=...``) or a step option by step
name or index (``sample.n=8``, ``steps.1.n=8``); values are parsed as YAML. Unknown keys
and wrong types are errors. ``executor`` names where map steps run: ``local`` (the
default) or ``ray``, as a name or a mapping with its options; ``--executor`` overrides the
name (keeping the recipe's options when the name is the same). The local executor runs each
model-holding step in a worker process that exits with the step; ``in_process: true`` (or
``prefdata run --in-process``, or ``PREFDATA_IN_PROCESS=1``) keeps it in this process.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from prefdata.executors import make_executor
from prefdata.pipeline import Pipeline
from prefdata.steps import step_class

TOP_LEVEL = {"name", "workdir", "output", "shard_size", "executor", "steps", "description", "card",
             "rounds", "eval_prompts"}  # rounds, eval_prompts: prefdata.rounds


class RecipeError(ValueError):
    pass


@dataclass
class Recipe:
    path: str
    data: dict

    @classmethod
    def from_args(cls, args) -> "Recipe":
        """The recipe of a ``prefdata run``/``gc`` command line: --set, --workdir, --output, --limit."""
        overrides = list(args.overrides)
        if getattr(args, "workdir", None):
            overrides.append(f"workdir={args.workdir}")
        if getattr(args, "output", None):
            overrides.append(f"output={args.output}")
        return cls.load(args.recipe, overrides, limit=args.limit)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = (), limit: int | None = None) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
            raise RecipeError(f"recipe {path} must be a mapping with a non-empty 'steps' list")
        unknown = sorted(set(data) - TOP_LEVEL)
        if unknown:
            raise RecipeError(f"recipe {path}: unknown top-level key(s) {unknown}; known: {sorted(TOP_LEVEL)}")
        data = copy.deepcopy(data)
        for i, step in enumerate(data["steps"]):
            if not isinstance(step, dict) or "step" not in step:
                raise RecipeError(f"recipe {path}: steps[{i}] must be a mapping with a 'step' key")
        for item in overrides:
            apply_override(data, item, where=str(path))
        if limit is not None:
            data["steps"][0]["limit"] = limit
        return cls(str(path), data)

    def build(self, executor=None, progress: bool = True, executor_name: str | None = None,
              force: str | int | None = None) -> Pipeline:
        """The pipeline; ``executor`` (an object) wins over ``executor_name`` and the recipe's key.

        ``force``: recompute from this step on (a step name, ``name[k]`` for the k-th step of
        that name, or an index)."""
        if executor is None:
            executor = recipe_executor(self.data.get("executor"), self.path, executor_name)
        if "rounds" in self.data or "eval_prompts" in self.data:
            raise RecipeError(f"recipe {self.path}: a recipe with rounds: runs through prefdata.rounds "
                              "(prefdata run does that)")
        steps = []
        for i, spec in enumerate(self.data["steps"]):
            options = {k: v for k, v in spec.items() if k != "step"}
            placeholder = [k for k, v in options.items() if v == "policy"]
            if placeholder:
                raise RecipeError(f"recipe {self.path}: steps[{i}] ({spec['step']}): {placeholder[0]}: policy names the "
                                  "model trained in the previous round, so it needs a top-level rounds: block "
                                  "(or name a model here)")
            try:
                cls = step_class(spec["step"])
                steps.append(cls(**options))
            except (ValueError, TypeError, ImportError) as exc:
                raise RecipeError(f"recipe {self.path}: steps[{i}] ({spec['step']}): {exc}") from None
        if any(s.name == "train" for s in steps):
            from prefdata.steps.train import check_win_prob

            try:
                check_win_prob(steps, where=f"recipe {self.path}")
            except ValueError as exc:
                raise RecipeError(str(exc)) from None
        return Pipeline(
            steps,
            workdir=self.data.get("workdir", f"work/{self.data.get('name', 'pipeline')}"),
            output=self.data.get("output"),
            shard_size=int(self.data.get("shard_size", 64)),
            executor=executor,
            progress=progress,
            info={"recipe": self.data, "recipe_path": self.path},
            force_from=None if force is None else self.step_index(force),
        )

    def step_index(self, which: str | int) -> int:
        """A step by index, name (the first of that name) or ``name[k]`` (the k-th, from 1)."""
        names = [s["step"] for s in self.data["steps"]]
        text = str(which).strip()
        if text.isdigit():
            if int(text) < len(names):
                return int(text)
        else:
            name, _, k = text.partition("[")
            hits = [i for i, n in enumerate(names) if n == name]
            k = int(k.rstrip("]")) if k.rstrip("]").isdigit() else 1
            if 1 <= k <= len(hits):
                return hits[k - 1]
        listing = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
        raise RecipeError(f"recipe {self.path}: no step '{which}' to force; give a name or an index ({listing})")


def recipe_executor(spec, where: str = "recipe", name: str | None = None):
    """An executor from a recipe's ``executor:`` (a name or ``{name: ..., option: ...}``)."""
    if spec is None:
        spec = "local"
    if isinstance(spec, str):
        spec_name, options = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        options = {k: v for k, v in spec.items() if k != "name"}
        spec_name = spec["name"]
    else:
        raise RecipeError(f"recipe {where}: executor must be a name (local, ray) or a mapping with a "
                          f"'name' key, e.g. {{name: ray, num_actors: 2}}; got {spec!r}")
    if name is not None and name != spec_name:
        spec_name, options = name, {}
    try:
        return make_executor(spec_name, **options)
    except (ValueError, TypeError, ImportError) as exc:
        raise RecipeError(f"recipe {where}: executor: {exc}") from None


def apply_override(data: dict, item: str, where: str = "recipe") -> None:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key=value")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    if len(parts) == 1:
        if parts[0] not in TOP_LEVEL - {"steps"}:
            raise RecipeError(f"--set {key}: unknown key; use one of {sorted(TOP_LEVEL - {'steps'})} or <step>.<option>")
        data[parts[0]] = value
        return
    if parts[0] == "steps" and len(parts) == 3 and parts[1].isdigit():
        index = int(parts[1])
        if index >= len(data["steps"]):
            raise RecipeError(f"--set {key}: the recipe has {len(data['steps'])} steps")
        targets = [data["steps"][index]]
        option = parts[2]
    elif len(parts) == 2:
        targets = [s for s in data["steps"] if s["step"] == parts[0]]
        option = parts[1]
        if not targets:
            names = [s["step"] for s in data["steps"]]
            raise RecipeError(f"--set {key}: no step named '{parts[0]}' in {where} (steps: {names})")
    else:
        raise RecipeError(f"--set {key}: expected <key>, <step>.<option> or steps.<index>.<option>")
    for target in targets:
        target[option] = value
