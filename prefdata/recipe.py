"""Recipes: a YAML file naming the steps of a pipeline and their options.

```yaml
name: quickstart
workdir: work/quickstart
output: out/pairs.parquet
shard_size: 4
executor: local            # or ray, or {name: ray, num_actors: 2, num_cpus_per_actor: 0.5}
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
name (keeping the recipe's options when the name is the same).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from prefdata.executors import make_executor
from prefdata.pipeline import Pipeline
from prefdata.steps import step_class

TOP_LEVEL = {"name", "workdir", "output", "shard_size", "executor", "steps", "description", "card"}


class RecipeError(ValueError):
    pass


@dataclass
class Recipe:
    path: str
    data: dict

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

    def build(self, executor=None, progress: bool = True, executor_name: str | None = None) -> Pipeline:
        """The pipeline; ``executor`` (an object) wins over ``executor_name`` and the recipe's key."""
        if executor is None:
            executor = recipe_executor(self.data.get("executor"), self.path, executor_name)
        steps = []
        for i, spec in enumerate(self.data["steps"]):
            options = {k: v for k, v in spec.items() if k != "step"}
            try:
                cls = step_class(spec["step"])
                steps.append(cls(**options))
            except (ValueError, TypeError, ImportError) as exc:
                raise RecipeError(f"recipe {self.path}: steps[{i}] ({spec['step']}): {exc}") from None
        return Pipeline(
            steps,
            workdir=self.data.get("workdir", f"work/{self.data.get('name', 'pipeline')}"),
            output=self.data.get("output"),
            shard_size=int(self.data.get("shard_size", 64)),
            executor=executor,
            progress=progress,
            info={"recipe": self.data, "recipe_path": self.path},
        )


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
