"""Human-in-the-loop with Argilla: push hard pairs, pull human labels, merge them back.

* ``push`` creates (once) an Argilla dataset with the prompt, the two responses as A and
  B in a per-record random order (kept in hidden metadata to undo later), a preference
  question (A / B / tie), an optional rationale, the AI verdict as a suggestion and the
  AI scores as hidden metadata. The record id is the pair id: ids already in the dataset
  are skipped, and a batch is an idempotent upsert, so a push that dies half way (or whose
  server restarts) completes when run again, with every pair present once. Batches are
  retried with exponential backoff on connection errors and 5xx answers.
* ``fetch_annotations`` reads every record and its responses; ``merge`` resolves several
  annotators by a policy (``majority``: a split vote is a tie; ``first``: the earliest
  response; ``keep_all``: one row per response, so a pair id repeats), maps A/B back to
  chosen/rejected (a human flip swaps every chosen/rejected column), and marks the pair
  ``label_source = human`` with the AI label kept beside it (``ai_chosen_id``,
  ``ai_rejected_id``, ``human_verdict`` agree|flip|tie, ``human_agrees_with_ai``,
  ``annotator_count``, ``annotators``, ``human_rationale``). Unanswered pushed pairs stay
  AI-labelled or go to quarantine (``unanswered``); human ties are excluded or keep the AI
  label (``ties``).

Credentials come from ``ARGILLA_API_URL`` / ``ARGILLA_API_KEY``; without them, from a dev
server started by ``prefdata argilla serve``. The key is never logged or written out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import polars as pl
import pyarrow as pa

from prefdata.schema import PAIR, PAIR_OPTIONAL, conform, stable_hash
from prefdata.step import Output

log = logging.getLogger(__name__)

QUESTION = "preference"
RATIONALE = "rationale"
LABELS = {"A": "Response A is better", "B": "Response B is better", "tie": "Tie: neither is better"}
SCORE_METADATA = ("score_chosen", "score_rejected", "margin", "strength", "flip_prob", "route_score")
# Metadata with a property can be filtered in Argilla's UI, but argilla-server validates every such
# value on upload (~3 ms each, most of a bulk upsert's time); the rest is sent as extra metadata,
# which only owners and admins see, like hidden properties.
FILTERABLE = ("flip_prob", "strength", "margin", "route_score")
GUIDELINES = (
    "Read the conversation, then the two responses. Pick the response that is more helpful, "
    "honest and harmless; pick Tie only when neither is better. Optionally say why. "
    "Discard a record you cannot judge."
)
LIST_LIMIT = 1000  # argilla-server's maximum page size
MAX_BATCH = 500  # argilla-server's maximum records per bulk upsert
CLEARED_ON_FLIP = ("ches", "ln_ches", "rationale")
PROVENANCE = ("ai_chosen_id", "ai_rejected_id", "human_verdict", "human_agrees_with_ai", "annotator_count",
              "discarded_count", "annotators", "human_rationale")


class ArgillaError(RuntimeError):
    """Argilla refused or could not be reached; the message says where and what to do."""


class DatasetMissing(ArgillaError):
    """The dataset to pull from does not exist (yet)."""


# -- configs ----------------------------------------------------------------------------------
@dataclass
class DatasetConfig:
    """Which Argilla dataset; the server and key come from the environment, never from here."""

    dataset: str = "prefdata-pairs"
    workspace: str = "prefdata"


@dataclass
class PushConfig(DatasetConfig):
    batch_size: int = 200
    seed: int = 0  # decides the A/B order of each pair (a hash of seed and pair id)
    suggest_ai_label: bool = True
    min_submitted: int = 1  # Argilla's task distribution: responses before a record is complete
    only_routed: bool = True  # with a ``route`` column, push only rows routed to humans
    retries: int = 8
    guidelines: str = GUIDELINES


@dataclass
class MergeConfig:
    policy: Literal["majority", "first", "keep_all"] = "majority"
    unanswered: Literal["keep_ai", "exclude"] = "keep_ai"  # pushed pairs with no submitted response
    ties: Literal["exclude", "keep_ai"] = "exclude"  # a human tie (or a split vote)


@dataclass
class PullConfig(DatasetConfig, MergeConfig):
    retries: int = 8


@dataclass
class PushResult:
    dataset_id: str
    created: int
    already_present: int
    batches: int
    retries: int
    seconds: float

    @property
    def records_per_second(self) -> float:
        return self.created / self.seconds if self.seconds > 0 else float("inf")


# -- connecting -------------------------------------------------------------------------------
def credentials(api_url: str | None = None, api_key: str | None = None) -> tuple[str, str]:
    """(url, key): arguments, then ARGILLA_API_URL / ARGILLA_API_KEY, then a running dev server."""
    url = api_url or os.environ.get("ARGILLA_API_URL")
    key = api_key or os.environ.get("ARGILLA_API_KEY")
    if not url or not key:
        from prefdata.argilla_dev.server import running_server

        dev = running_server()
        if dev is not None and (not url or url.rstrip("/") == dev[0]):
            url, key = dev[0], key or dev[1]
    if not url:
        raise ArgillaError("no Argilla server: set ARGILLA_API_URL (and ARGILLA_API_KEY), "
                           "or start a local one with `prefdata argilla serve`")
    if not key:
        raise ArgillaError(f"no API key for Argilla at {url}: set ARGILLA_API_KEY")
    return url.rstrip("/"), key


def connect(api_url: str | None = None, api_key: str | None = None, timeout: int = 60, retries: int = 2):
    """An ``argilla.Argilla`` client, with errors that say which URL refused and why.

    ``retries`` are the SDK's immediate reconnects; longer outages are ``with_retries``' job.
    """
    rg = require_sdk()
    import httpx
    from argilla._exceptions import ArgillaCredentialsError

    url, key = credentials(api_url, api_key)
    try:
        return rg.Argilla(api_url=url, api_key=key, timeout=timeout, retries=retries)
    except ArgillaCredentialsError:
        raise ArgillaError(f"Argilla at {url} refused the API key (401 Unauthorized): check ARGILLA_API_KEY") from None
    except httpx.TransportError as exc:
        raise ArgillaError(f"cannot reach Argilla at {url} ({type(exc).__name__}: {exc}); is the server running? "
                           "(`prefdata argilla serve`, or set ARGILLA_API_URL)") from None


def require_sdk():
    try:
        import argilla as rg
    except ImportError:
        raise ImportError("Argilla support needs the argilla SDK: pip install 'prefdata[argilla]'") from None
    return rg


def with_retries(call: Callable[[], Any], retries: int, what: str, url: str = "", on_retry=None) -> Any:
    """Run ``call``; on connection errors and 5xx answers retry with exponential backoff.

    Only for idempotent calls (upserts keyed by record id, reads).
    """
    import httpx
    from argilla._exceptions import ArgillaAPIError

    for attempt in range(retries + 1):
        try:
            return call()
        except (httpx.TransportError, ArgillaAPIError) as exc:
            status = getattr(exc, "status_code", None)
            if isinstance(exc, ArgillaAPIError) and (status is None or status < 500):
                raise
            if attempt == retries:
                reason = f"HTTP {status}" if status else type(exc).__name__
                raise ArgillaError(f"{what} failed after {retries + 1} attempts ({reason}) at {url}; "
                                   "run the same command again once the server is back: "
                                   "work already done is kept and not repeated") from None
            delay = min(30.0, 0.5 * 2**attempt) * (0.5 + random.random() / 2)
            log.warning("%s: %s, retrying in %.1f s (%d/%d)", what, type(exc).__name__, delay, attempt + 1, retries)
            if on_retry is not None:
                on_retry()
            time.sleep(delay)


# -- the dataset ------------------------------------------------------------------------------
def dataset_settings(cfg: PushConfig, columns: list[str] = FILTERABLE):
    """Fields, questions and metadata of a new dataset; filterable scores among ``columns``."""
    rg = require_sdk()
    return rg.Settings(
        guidelines=cfg.guidelines,
        fields=[
            rg.ChatField("prompt", title="Conversation"),
            rg.TextField("response_a", title="Response A", use_markdown=True),
            rg.TextField("response_b", title="Response B", use_markdown=True),
        ],
        questions=[
            rg.LabelQuestion(QUESTION, labels=LABELS, title="Which response is better?"),
            rg.TextQuestion(RATIONALE, title="Why? (optional)", required=False),
        ],
        metadata=[rg.FloatMetadataProperty(name, visible_for_annotators=False) for name in FILTERABLE
                  if name in columns],
        distribution=rg.TaskDistribution(min_submitted=cfg.min_submitted),
        allow_extra_metadata=True,  # a_is and the raw scores: extra metadata, hidden from annotators
    )


def find_dataset(client, cfg: DatasetConfig):
    """The dataset, or None. A draft left by an interrupted create is deleted (it has no records)."""
    with warnings.catch_warnings():  # the SDK warns when a dataset is not found
        warnings.simplefilter("ignore", UserWarning)
        dataset = client.datasets(name=cfg.dataset, workspace=cfg.workspace)
    if dataset is None:
        return None
    if getattr(dataset._model, "status", "ready") != "ready":
        log.warning("dataset %s/%s was left as a draft by an interrupted push; recreating it",
                    cfg.workspace, cfg.dataset)
        dataset.delete()
        return None
    questions = {q.name for q in dataset.settings.questions}
    fields = {f.name for f in dataset.settings.fields}
    if QUESTION not in questions or not {"prompt", "response_a", "response_b"} <= fields:
        raise ArgillaError(f"dataset '{cfg.workspace}/{cfg.dataset}' at {client.api_url} exists with another layout "
                           f"(fields {sorted(fields)}, questions {sorted(questions)}); choose another dataset name")
    return dataset


def get_or_create_dataset(client, cfg: PushConfig, columns: list[str] = FILTERABLE):
    rg = require_sdk()
    dataset = with_retries(lambda: find_dataset(client, cfg), cfg.retries, "looking up the dataset", client.api_url)
    if dataset is not None:
        return dataset
    workspace = client.workspaces(cfg.workspace)
    if workspace is None:
        raise ArgillaError(f"workspace '{cfg.workspace}' does not exist at {client.api_url}; create it in Argilla "
                           "or set the workspace option")
    dataset = rg.Dataset(name=cfg.dataset, workspace=workspace, settings=dataset_settings(cfg, columns),
                         client=client)
    return dataset.create()


def existing_ids(client, dataset, retries: int = 8) -> set[str]:
    """External ids (pair ids) of every record in the dataset."""
    ids: set[str] = set()
    for page in _record_pages(client, dataset, include=(), retries=retries):
        ids.update(str(item["external_id"]) for item in page)
    return ids


def _record_pages(client, dataset, include: tuple[str, ...], retries: int):
    offset = 0
    while True:
        def fetch(offset=offset):
            params = {"offset": offset, "limit": LIST_LIMIT}
            if include:
                params["include"] = list(include)
            response = client.http_client.get(f"/api/v1/datasets/{dataset.id}/records", params=params)
            _raise_for_status(response, client.api_url)
            return response.json()["items"]

        items = with_retries(fetch, retries, "listing records", client.api_url)
        if items:
            yield items
        if len(items) < LIST_LIMIT:
            return
        offset += len(items)


def _raise_for_status(response, url: str) -> None:
    from argilla._exceptions import ArgillaAPIError

    if response.status_code >= 400:
        if response.status_code == 401:
            raise ArgillaError(f"Argilla at {url} refused the API key (401 Unauthorized): check ARGILLA_API_KEY")
        raise ArgillaAPIError(f"HTTP {response.status_code}: {response.text[:300]}",
                              status_code=response.status_code)


# -- push -------------------------------------------------------------------------------------
def a_is_chosen(pair_id: str, seed: int) -> bool:
    """Per-pair random order, reproducible from (seed, pair id) on any machine: True puts chosen as A."""
    return hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()[0] % 2 == 0


def pairs_to_push(table: pa.Table, cfg: PushConfig) -> pl.DataFrame:
    df = pl.from_arrow(table)
    missing = [c for c in ("pair_id", "prompt", "chosen", "rejected") if c not in df.columns]
    if missing:
        raise ValueError(f"push needs a pair table; missing column(s) {missing}")
    if cfg.only_routed and "route" in df.columns:
        df = df.filter(pl.col("route") == "human")
    dupes = df.filter(pl.col("pair_id").is_duplicated())
    if dupes.height:
        raise ValueError(f"push: pair_id must be unique, {dupes['pair_id'].n_unique()} ids repeat "
                         f"(e.g. {dupes['pair_id'][0]})")
    return df


def build_records(df: pl.DataFrame, cfg: PushConfig) -> list:
    """rg.Record objects for the rows of ``df``: the one row loop, at the edge (talking to Argilla)."""
    rg = require_sdk()
    metadata_cols = [c for c in SCORE_METADATA if c in df.columns]
    has_flip = "flip_prob" in df.columns
    records = []
    for row in df.iter_rows(named=True):
        a_chosen = a_is_chosen(row["pair_id"], cfg.seed)
        a, b = (row["chosen"], row["rejected"]) if a_chosen else (row["rejected"], row["chosen"])
        metadata = {"a_is": "chosen" if a_chosen else "rejected"}
        for c in metadata_cols:
            value = row[c]
            if value is not None and math.isfinite(value):
                metadata[c] = float(value)
        suggestions = []
        if cfg.suggest_ai_label:
            score = None
            if has_flip and row["flip_prob"] is not None and math.isfinite(row["flip_prob"]):
                score = min(1.0, max(0.0, 1.0 - float(row["flip_prob"])))
            suggestions.append(rg.Suggestion(QUESTION, "A" if a_chosen else "B", score=score,
                                             agent=f"prefdata:{row.get('label_source') or 'ai'}", type="model"))
        records.append(rg.Record(
            id=row["pair_id"],
            fields={"prompt": [{"role": m["role"], "content": m["content"]} for m in row["prompt"] or []],
                    "response_a": render_messages(a), "response_b": render_messages(b)},
            metadata=metadata,
            suggestions=suggestions,
        ))
    return records


def render_messages(messages: list[dict] | None) -> str:
    messages = messages or []
    if len(messages) == 1:
        return messages[0]["content"] or ""
    return "\n\n".join(f"**{m['role']}**: {m['content']}" for m in messages)


def push(table: pa.Table, cfg: PushConfig | None = None, client=None,
         progress: Callable[[int, int], None] | None = None) -> PushResult:
    """Push the pairs of ``table`` not yet in the dataset; returns what was created."""
    cfg = cfg or PushConfig()
    if not 1 <= cfg.batch_size <= MAX_BATCH:
        raise ValueError(f"push: batch_size must be between 1 and {MAX_BATCH}, got {cfg.batch_size}")
    start = time.perf_counter()
    df = pairs_to_push(table, cfg)
    client = client or connect()
    dataset = get_or_create_dataset(client, cfg, df.columns)
    present = existing_ids(client, dataset, cfg.retries)
    todo = df.filter(~pl.col("pair_id").is_in(list(present)))
    records = build_records(todo, cfg)
    retried = [0]
    batches = 0
    for i in range(0, len(records), cfg.batch_size):
        batch = records[i: i + cfg.batch_size]
        for record in batch:
            record.dataset = dataset
        models = [record.api_model() for record in batch]
        with_retries(lambda: client.api.records.bulk_upsert(dataset_id=dataset.id, records=models),
                     cfg.retries, f"pushing records {i}-{i + len(batch)} of {len(records)}", client.api_url,
                     on_retry=lambda: retried.__setitem__(0, retried[0] + 1))
        batches += 1
        if progress is not None:
            progress(i + len(batch), len(records))
    return PushResult(dataset_id=str(dataset.id), created=len(records), already_present=df.height - len(records),
                      batches=batches, retries=retried[0], seconds=time.perf_counter() - start)


# -- pull and merge ---------------------------------------------------------------------------
ANNOTATIONS = pa.schema([
    ("pair_id", pa.string()),
    ("a_is", pa.string()),
    ("user_id", pa.string()),
    ("status", pa.string()),
    ("label", pa.string()),
    ("rationale", pa.string()),
    ("inserted_at", pa.string()),
])


def fetch_annotations(cfg: DatasetConfig | None = None, client=None, retries: int = 8) -> pa.Table:
    """One row per (record, response); a record without responses gives one row with nulls."""
    cfg = cfg or DatasetConfig()
    client = client or connect()
    dataset = with_retries(lambda: find_dataset(client, cfg), retries, "looking up the dataset", client.api_url)
    if dataset is None:
        raise DatasetMissing(f"no dataset '{cfg.workspace}/{cfg.dataset}' at {client.api_url}; push first")
    rows = {name: [] for name in ANNOTATIONS.names}

    def add(pair_id, a_is, response):
        values = (response or {}).get("values") or {}
        rows["pair_id"].append(pair_id)
        rows["a_is"].append(a_is)
        rows["user_id"].append(str(response["user_id"]) if response else None)
        rows["status"].append(response["status"] if response else None)
        rows["label"].append((values.get(QUESTION) or {}).get("value"))
        rows["rationale"].append((values.get(RATIONALE) or {}).get("value"))
        rows["inserted_at"].append(response["inserted_at"] if response else None)

    for page in _record_pages(client, dataset, include=("responses",), retries=retries):
        for item in page:
            a_is = (item.get("metadata") or {}).get("a_is")
            responses = item.get("responses") or []
            for response in responses:
                add(str(item["external_id"]), a_is, response)
            if not responses:
                add(str(item["external_id"]), a_is, None)
    return pa.table(rows, schema=ANNOTATIONS)


def annotations_fingerprint(annotations: pa.Table) -> str:
    """A hash of the human labels; changes exactly when a response is added or changed."""
    df = pl.from_arrow(annotations).sort(["pair_id", "user_id", "inserted_at"], nulls_last=True)
    return stable_hash(df.select("pair_id", "user_id", "status", "label", "rationale").rows())


def resolve(annotations: pa.Table, policy: str) -> pl.DataFrame:
    """One verdict per pair (two or more rows per pair under ``keep_all``), from submitted responses.

    verdict: ``agree`` (the human picked the AI's chosen), ``flip`` or ``tie``. Under
    ``majority`` a split vote between A and B counts as a tie.
    """
    if policy not in ("majority", "first", "keep_all"):
        raise ValueError(f"merge: policy must be majority, first or keep_all, got '{policy}'")
    ann = pl.from_arrow(annotations)
    pushed = ann.select("pair_id").unique()
    discarded = ann.filter(pl.col("status") == "discarded").group_by("pair_id").agg(
        pl.len().cast(pl.Int64).alias("discarded_count"))
    sub = ann.filter((pl.col("status") == "submitted") & pl.col("label").is_not_null()).with_columns(
        pl.when(pl.col("label") == "tie").then(pl.lit("tie"))
        .when((pl.col("label") == "A") == (pl.col("a_is") == "chosen")).then(pl.lit("agree"))
        .otherwise(pl.lit("flip")).alias("verdict")
    ).sort(["pair_id", "inserted_at", "user_id"])
    per_pair = sub.group_by("pair_id", maintain_order=True).agg(
        pl.len().cast(pl.Int64).alias("annotator_count"),
        pl.col("user_id").alias("annotators"),
    )
    if policy == "keep_all":
        chosen = sub.select("pair_id", "verdict", pl.col("rationale").alias("human_rationale"),
                            pl.concat_list(pl.col("user_id")).alias("annotators_one"),
                            pl.int_range(pl.len()).over("pair_id").alias("_k"))
        out = chosen.join(per_pair.select("pair_id", "annotator_count"), on="pair_id")
        out = out.rename({"annotators_one": "annotators"})
    else:
        if policy == "first":
            verdicts = sub.group_by("pair_id", maintain_order=True).first().select("pair_id", "verdict")
        else:
            counts = sub.group_by(["pair_id", "verdict"]).agg(pl.len().alias("n"))
            top = counts.filter(pl.col("n") == pl.col("n").max().over("pair_id"))
            verdicts = top.group_by("pair_id").agg(pl.len().alias("k"), pl.col("verdict").first()).select(
                "pair_id", pl.when(pl.col("k") > 1).then(pl.lit("tie")).otherwise(pl.col("verdict")).alias("verdict"))
        why = sub.join(verdicts, on=["pair_id", "verdict"]).filter(
            pl.col("rationale").is_not_null() & (pl.col("rationale").str.strip_chars() != "")
        ).group_by("pair_id", maintain_order=True).agg(pl.col("rationale").first().alias("human_rationale"))
        out = verdicts.join(why, on="pair_id", how="left").join(per_pair, on="pair_id").with_columns(
            pl.lit(0, pl.Int64).alias("_k"))
    out = pushed.join(out, on="pair_id", how="left").join(discarded, on="pair_id", how="left")
    return out.with_columns(
        pl.col("annotator_count").fill_null(0), pl.col("discarded_count").fill_null(0),
        pl.col("annotators").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        pl.lit(True).alias("_pushed"),
    ).select("pair_id", "verdict", "human_rationale", "annotator_count", "discarded_count", "annotators", "_pushed",
             pl.col("_k").cast(pl.Int64))


def merge(pairs: pa.Table, annotations: pa.Table, cfg: MergeConfig | None = None) -> Output:
    """Pairs with human verdicts applied and provenance added; excluded rows go to quarantine."""
    cfg = cfg or MergeConfig()
    if cfg.unanswered not in ("keep_ai", "exclude") or cfg.ties not in ("exclude", "keep_ai"):
        raise ValueError("merge: unanswered must be keep_ai or exclude; ties must be exclude or keep_ai")
    df = _undo_merge(pl.from_arrow(pairs))
    if "label_source" not in df.columns:
        df = df.with_columns(pl.lit("ai").alias("label_source"))
    verdicts = resolve(annotations, cfg.policy)
    df = df.with_columns(pl.col("chosen_id").alias("ai_chosen_id") if "chosen_id" in df.columns
                         else pl.lit(None, pl.String).alias("ai_chosen_id"),
                         pl.col("rejected_id").alias("ai_rejected_id") if "rejected_id" in df.columns
                         else pl.lit(None, pl.String).alias("ai_rejected_id"))
    df = df.with_row_index("_pos").join(verdicts, on="pair_id", how="left").sort(
        ["_pos", "_k"], nulls_last=True).drop("_pos", "_k").with_columns(
        pl.col("annotator_count").fill_null(0), pl.col("discarded_count").fill_null(0),
        pl.col("annotators").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        pl.col("_pushed").fill_null(False),
    )
    flip = pl.col("verdict") == "flip"
    df = df.with_columns(_swap_exprs(df.columns, flip))
    human = pl.col("verdict").is_in(["agree", "flip"])
    df = df.with_columns(
        pl.when(human).then(pl.lit("human")).otherwise(pl.col("label_source")).alias("label_source"),
        pl.col("verdict").alias("human_verdict"),
        pl.when(pl.col("verdict").is_null()).then(None).otherwise(pl.col("verdict") == "agree")
        .alias("human_agrees_with_ai"),
    )
    reason = (
        pl.when((pl.col("verdict") == "tie") & pl.lit(cfg.ties == "exclude")).then(pl.lit("human_tie"))
        .when(pl.col("_pushed") & pl.col("verdict").is_null() & pl.lit(cfg.unanswered == "exclude"))
        .then(pl.lit("unanswered"))
        .otherwise(None)
    )
    counts = {
        "human_agreed": int(df.filter(pl.col("verdict") == "agree").height),
        "human_flipped": int(df.filter(pl.col("verdict") == "flip").height),
        "human_ties": int(df.filter(pl.col("verdict") == "tie").height),
        "unanswered": int(df.filter(pl.col("_pushed") & pl.col("verdict").is_null()).height),
    }
    df = df.with_columns(reason.alias("_reason")).drop("verdict", "_pushed")
    kept = df.filter(pl.col("_reason").is_null()).drop("_reason")
    dropped = df.filter(pl.col("_reason").is_not_null()).rename({"_reason": "reason"})
    for r, n in dropped.group_by("reason").len().iter_rows():
        counts[f"dropped_{r}"] = int(n)
    return Output(_contract(kept), _contract(dropped) if dropped.height else None, counts)


def _contract(df: pl.DataFrame) -> pa.Table:
    return conform(conform(df.to_arrow(), PAIR), PAIR_OPTIONAL)


def _undo_merge(df: pl.DataFrame) -> pl.DataFrame:
    """Back to the AI labels if ``df`` is itself the output of a merge, so pulling twice is safe."""
    if "human_verdict" in df.columns:
        flipped = pl.col("human_verdict") == "flip"
        human = pl.col("human_verdict").is_in(["agree", "flip"]).fill_null(False)
        df = df.with_columns(_swap_exprs(df.columns, flipped.fill_null(False))).with_columns(
            pl.when(human).then(pl.lit("ai")).otherwise(pl.col("label_source")).alias("label_source"))
        df = df.unique(subset="pair_id", keep="first", maintain_order=True)  # keep_all repeated pairs
    return df.drop([c for c in PROVENANCE if c in df.columns])


def _swap_exprs(columns: list[str], flip: pl.Expr) -> list[pl.Expr]:
    """Expressions that turn the pair around where ``flip``: every chosen/rejected column pair
    (``chosen``/``rejected``, ``score_chosen``/``score_rejected`` …) swaps, ``margin`` and
    ``strength`` change sign, ``flip_prob`` becomes 1 − p, and CHES and the AI rationale
    (about the other order) become null, as in the noise step's flips."""
    exprs = []
    for c in columns:
        if "chosen" in c and c.replace("chosen", "rejected") in columns and not c.startswith("ai_"):
            other = c.replace("chosen", "rejected")
            exprs.append(pl.when(flip).then(pl.col(other)).otherwise(pl.col(c)).alias(c))
            exprs.append(pl.when(flip).then(pl.col(c)).otherwise(pl.col(other)).alias(other))
    for c in ("margin", "strength"):
        if c in columns:
            exprs.append(pl.when(flip).then(-pl.col(c)).otherwise(pl.col(c)).alias(c))
    if "flip_prob" in columns:
        exprs.append(pl.when(flip).then(1.0 - pl.col("flip_prob")).otherwise(pl.col("flip_prob")).alias("flip_prob"))
    for c in CLEARED_ON_FLIP:
        if c in columns:
            exprs.append(pl.when(flip).then(None).otherwise(pl.col(c)).alias(c))
    return exprs


def pull(pairs: pa.Table, cfg: PullConfig | None = None, client=None) -> Output:
    """Fetch the human labels of ``cfg.dataset`` and merge them into ``pairs``."""
    cfg = cfg or PullConfig()
    return merge(pairs, fetch_annotations(cfg, client, cfg.retries), cfg)


# -- command line -----------------------------------------------------------------------------
def cli_main(argv: list[str]) -> int:
    """``prefdata argilla serve | stop | status | push | pull``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:  # retries and recoveries are warnings; the SDK's chatter is info
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ArgillaError, ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"prefdata argilla: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefdata argilla", description=(
        "Send hard pairs to human annotators in Argilla and merge their labels back. The server "
        "and key come from ARGILLA_API_URL / ARGILLA_API_KEY, or from a local dev server ('serve')."))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start a local argilla-server 2.8 (own venv, SQLite, Redis, in-process search)")
    serve.add_argument("--data-dir", help="where the server keeps its data (default: <cache>/argilla-dev)")
    serve.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default 6900; 0 = any free port)")
    serve.add_argument("--no-worker", action="store_true", help="no rq worker for argilla's background jobs")
    serve.set_defaults(func=_cmd_serve)
    for name, func, text in (("stop", _cmd_stop, "stop the local server"),
                             ("status", _cmd_status, "show the local server's state")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--data-dir")
        p.set_defaults(func=func)

    push_p = sub.add_parser("push", help="push pairs (those routed to humans) to an Argilla dataset")
    push_p.add_argument("pairs", help="a pair parquet file")
    _dataset_args(push_p)
    push_p.add_argument("--batch-size", type=int, default=PushConfig.batch_size)
    push_p.add_argument("--seed", type=int, default=PushConfig.seed, help="seed of the A/B order")
    push_p.add_argument("--all", action="store_true", help="push every pair, ignoring the route column")
    push_p.add_argument("--no-suggestion", action="store_true", help="do not show the AI verdict to annotators")
    push_p.add_argument("--min-submitted", type=int, default=PushConfig.min_submitted,
                        help="responses needed before a record counts as complete")
    push_p.set_defaults(func=_cmd_push)

    pull_p = sub.add_parser("pull", help="merge submitted human labels into a pair parquet")
    pull_p.add_argument("pairs", help="the pair parquet that was pushed")
    pull_p.add_argument("-o", "--output", required=True, help="merged pair parquet to write")
    _dataset_args(pull_p)
    pull_p.add_argument("--policy", choices=["majority", "first", "keep_all"], default="majority")
    pull_p.add_argument("--unanswered", choices=["keep_ai", "exclude"], default="keep_ai")
    pull_p.add_argument("--ties", choices=["exclude", "keep_ai"], default="exclude")
    pull_p.set_defaults(func=_cmd_pull)
    return parser


def _dataset_args(p) -> None:
    p.add_argument("--dataset", default=DatasetConfig.dataset, help="Argilla dataset name")
    p.add_argument("--workspace", default=DatasetConfig.workspace, help="Argilla workspace")


def _cmd_serve(args) -> int:
    from prefdata.argilla_dev import serve

    info = serve(args.data_dir, port=args.port, worker=not args.no_worker)
    print(info.describe())
    if info.new_api_key:
        print("\nOwner API key (shown once; also kept, mode 0600, in the file above):\n"
              f"  export ARGILLA_API_URL={info.url}\n  export ARGILLA_API_KEY={info.new_api_key}")
    else:
        print(f"  export ARGILLA_API_URL={info.url}   (API key: ARGILLA_API_KEY, or the one shown at first start)")
    return 0


def _cmd_stop(args) -> int:
    from prefdata.argilla_dev import stop

    print("stopped" if stop(args.data_dir) else "no dev server running")
    return 0


def _cmd_status(args) -> int:
    from prefdata.argilla_dev import status

    print(json.dumps(status(args.data_dir), indent=2))
    return 0


def _cmd_push(args) -> int:
    import pyarrow.parquet as pq

    cfg = PushConfig(dataset=args.dataset, workspace=args.workspace, batch_size=args.batch_size, seed=args.seed,
                     only_routed=not args.all, suggest_ai_label=not args.no_suggestion,
                     min_submitted=args.min_submitted)
    result = push(pq.read_table(args.pairs), cfg)
    print(f"pushed {result.created} new record(s) to {cfg.workspace}/{cfg.dataset} in {result.batches} batch(es); "
          f"{result.already_present} already there; {result.seconds:.1f} s")
    return 0


def _cmd_pull(args) -> int:
    import pyarrow.parquet as pq

    from prefdata.io import write_parquet

    cfg = PullConfig(dataset=args.dataset, workspace=args.workspace, policy=args.policy,
                     unanswered=args.unanswered, ties=args.ties)
    out = pull(pq.read_table(args.pairs), cfg)
    output = Path(args.output)
    write_parquet(out.table, output)
    qpath = output.with_name(output.stem + ".quarantine.parquet")
    if out.quarantine is not None:
        write_parquet(out.quarantine, qpath)
    elif qpath.exists():
        qpath.unlink()
    summary = ", ".join(f"{k} {v}" for k, v in sorted(out.counts.items()))
    print(f"wrote {out.table.num_rows} pairs to {output} ({summary})")
    if out.quarantine is not None:
        print(f"excluded pairs, with reasons, in {qpath}")
    return 0
