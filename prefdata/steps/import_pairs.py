"""Import existing preference pairs as a RESPONSE table, keeping the original label.

Every later step (scoring, noise, CHES, building, routing, training) then runs on the
imported data unchanged. Input formats (``format``; ``auto`` decides per row):

* ``trl_conversational`` — TRL's conversational preference format: ``chosen`` and
  ``rejected`` are message lists, with an explicit ``prompt`` message list (then each
  completion is one assistant message) or without one (implicit prompt: both are whole
  conversations, and their shared prefix is the prompt);
* ``trl_standard`` — ``prompt``, ``chosen``, ``rejected`` strings (the prompt becomes one
  user message);
* ``hh_transcript`` — Anthropic HH-RLHF style: ``chosen``/``rejected`` are transcripts
  ``"\\n\\nHuman: …\\n\\nAssistant: …"``, split into messages; all turns before the final
  assistant reply are the prompt and must be identical in both transcripts. A pair whose
  transcripts differ earlier is reported (``prefix_mismatch``), never guessed.

Output: one row per response — ``prompt_id``, ``prompt``, ``source``, ``response_id``,
``response``, ``generator`` (``chosen_model``/``rejected_model`` when the file has them,
else ``"original"``), ``sample_index``, ``sampling`` (null), ``score_original`` (1.0 for
chosen, 0.0 for rejected), ``label_source = "original"``, ``original_pair`` (a stable id
of the original pair), ``original_role`` (``chosen``/``rejected``) and ``original_row``
(line or row of the file). All responses of a prompt are adjacent; the k-th pair of a
prompt has ``sample_index`` 2k (chosen) and 2k+1 (rejected). ``build_pairs`` with
``score: score_original`` (strategy ``auto`` or ``original``) gives back exactly the
imported pairs, one per ``original_pair``, however many share a prompt.

The file is read in batches (``prefdata.readers``, strict: a broken CSV quote, a bad JSON
line or a duplicated key is reported by its line); with ``limit`` reading stops once that
many pairs are imported. Bad rows raise an error naming file, row and field, or
(``on_error: quarantine``) go to the quarantine table with ``reason``; exact duplicate
pairs are skipped and counted. Literal chat-control text (``<|im_start|>`` …) in a prompt
or reply is counted in ``control_text_rows`` and handled by ``special_tokens`` (``keep``
| ``escape`` | ``quarantine``). Counts: ``rows_read``, ``imported``,
``skipped_duplicate``, ``quarantined_<reason>``, ``prompts_with_several_pairs``,
``control_text_rows``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa

from prefdata.control_text import CONTROL_PATTERN, ESCAPED, ControlText
from prefdata.readers import (QUARANTINE, BadRow, FileOptions, FileSource, Rows, quarantine_row, raise_first,
                              text_or_json)
from prefdata.schema import MESSAGES, RESPONSE, ROLES, SAMPLING
from prefdata.shards import KeyIndex, hash128
from prefdata.step import Output

PAIR_FORMATS = ("auto", "trl_conversational", "trl_standard", "hh_transcript")
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_enc = json.encoder.encode_basestring  # how json.dumps(ensure_ascii=False) writes a string
PAIRS = pl.Schema({"i": pl.Int64, "row": pl.Int64,
                   "prompt": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
                   "good": pl.String, "worse": pl.String, "gen_c": pl.String, "gen_r": pl.String,
                   "source": pl.String})
COLUMNS = list(RESPONSE.names) + ["score_original", "label_source", "original_pair", "original_role",
                                  "original_row"]


@dataclass
class ImportPairsConfig(FileOptions):
    format: str = "auto"  # auto | trl_conversational | trl_standard | hh_transcript
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"


class ImportPairs(FileSource):
    """Read chosen/rejected pairs (TRL conversational/standard, HH transcripts) into responses."""

    name: ClassVar[str] = "import_pairs"
    version: ClassVar[str] = "2"  # 2: strict readers, control-text count and policy
    Config: ClassVar[type] = ImportPairsConfig
    adjacent_prompts: ClassVar[bool] = True  # a prompt's pairs together, where its first pair was

    def problems(self) -> list[str]:
        c = self.config
        return [f"format must be one of {list(PAIR_FORMATS)}, got {c.format!r}"] if c.format not in PAIR_FORMATS else []

    def output_columns(self, columns: list[str]) -> list[str]:
        return list(COLUMNS)

    def convert_batches(self, batches: Iterable[Rows]) -> Iterator[Output]:
        return pair_batches(batches, self.config)


def pair_batches(batches: Iterable[Rows], c: ImportPairsConfig) -> Iterator[Output]:
    """One Output per batch read (its response rows, in file order, and its bad rows), then
    the counts. Duplicates, ``sample_index`` and ``limit`` span batches (``_Pairs``)."""
    state, path = _Pairs(c), None
    for rows in batches:
        path = rows.path
        out, more = state.batch(rows)
        yield out
        if not more:
            break
    if state.counts["rows_read"] == 0:
        raise ValueError(f"{path}: the file holds no rows; give a file with at least one pair")
    yield Output(pa.table({}), None, state.final_counts())


class _Pairs:
    """What the batches so far decided: the pairs imported (128-bit keys of prompt, chosen
    and rejected, to skip exact duplicates) and how many pairs each prompt has (its next
    pair's ``sample_index``), as ``KeyIndex``es rather than Python objects per pair."""

    def __init__(self, c: ImportPairsConfig):
        self.c = c
        self.counts = Counter(rows_read=0)
        self.quarantined: Counter = Counter()
        self.pair_counts = Counter(skipped_duplicate=0, imported=0, control_text_rows=0,
                                   prompts_with_several_pairs=0)
        self.seen, self.per_prompt = KeyIndex(), KeyIndex()

    def batch(self, rows: Rows) -> tuple[Output, bool]:
        """This batch's responses and quarantined rows; False once ``limit`` pairs are in."""
        c = self.c
        frame, bad = _batch_pairs(rows, c)
        frame = frame.sort("row")
        frame = frame.with_columns(pid=_ids(frame.select(_json_messages("prompt")).to_series(),
                                            frame["prompt"], lambda m: prompt_id(m)))
        keys = hash128(frame.select("pid", "good", "worse"))
        _, before = self.seen.get(keys)
        first = pl.DataFrame({"h0": keys[:, 0], "h1": keys[:, 1]}).select(pl.struct("h0", "h1").is_first_distinct())
        new = first.to_series().to_numpy() & ~before
        last_row = None
        if c.limit is not None and int(new.sum()) >= c.limit - self.pair_counts["imported"]:
            cut = int(np.flatnonzero(new)[c.limit - self.pair_counts["imported"] - 1]) + 1
            last_row = int(frame["row"][cut - 1])
            frame, keys, new = frame.head(cut), keys[:cut], new[:cut]
            bad = [r for r in bad if r["row"] <= last_row]  # rows after the limit are not imported, nor checked
        if bad and c.on_error == "raise":
            raise_first(bad)
        self._count_rows(rows, last_row)
        for r in bad:
            self.quarantined[f"quarantined_{r['reason']}"] += 1
        pairs = frame.filter(pl.Series(new))
        self.seen.add(keys[new], np.zeros(int(new.sum()), np.int64))
        pairs = self._numbered(pairs)
        self.pair_counts["skipped_duplicate"] += frame.height - pairs.height
        self.pair_counts["imported"] += pairs.height
        self.pair_counts["control_text_rows"] += int(pairs["control"].sum())
        self.pair_counts["prompts_with_several_pairs"] += int((pairs["k"] == 1).sum())
        quarantine = pa.Table.from_pylist(bad, schema=QUARANTINE) if bad else None
        return Output(response_rows(pairs), quarantine), last_row is None

    def _count_rows(self, rows: Rows, last_row: int | None) -> None:
        """Rows read: the whole batch, or up to the row of the ``limit``-th pair."""
        if last_row is None:
            self.counts["rows_read"] += len(rows) + len(rows.bad)
            return
        numbers = np.asarray(rows.numbers)
        self.counts["rows_read"] += int((numbers <= last_row).sum()) + sum(n <= last_row for n, _, _ in rows.bad)

    def _numbered(self, pairs: pl.DataFrame) -> pl.DataFrame:
        """``k``: the pair's number among its prompt's pairs, over all batches so far."""
        pairs = pairs.with_columns(k=pl.int_range(pl.len()).over("pid"))
        if not pairs.height:
            return pairs
        per = pairs.group_by("pid", maintain_order=True).len()
        keys = hash128(per.select("pid"))
        earlier, _ = self.per_prompt.get(keys, default=0)
        self.per_prompt.put(keys, earlier + per["len"].to_numpy())
        if not earlier.any():  # no prompt of this batch had pairs before
            return pairs
        per = per.select("pid", pl.Series("earlier", earlier))
        return pairs.join(per, on="pid", how="left", maintain_order="left").with_columns(
            k=pl.col("k") + pl.col("earlier")).drop("earlier")

    def final_counts(self) -> dict:
        counts = {**self.counts, **self.quarantined, **self.pair_counts}
        if not counts["control_text_rows"]:
            del counts["control_text_rows"]
        return counts


def _batch_pairs(rows: Rows, c: ImportPairsConfig) -> tuple[pl.DataFrame, list[dict]]:
    """One batch's pairs (PAIRS columns plus ``control``) and its bad rows."""
    bad = [quarantine_row(rows.path, rows.fmt, n, raw, exc) for n, raw, exc in rows.bad]
    if c.prompt_field not in rows.columns and c.format == "trl_standard" and len(rows):
        raise ValueError(f"{rows.path}: format trl_standard needs a '{c.prompt_field}' column (columns: "
                         f"{rows.columns}); set `prompt_field:` or use hh_transcript / trl_conversational")
    for name in (c.chosen_field, c.rejected_field):
        if name not in rows.columns and len(rows):
            raise ValueError(f"{rows.path}: no column '{name}' (columns: {rows.columns}); set "
                             f"`chosen_field:` / `rejected_field:` to the columns that hold the pair")
    fast, slow = _hh_fast(rows, c)
    if len(slow) > 64:  # most rows go row by row: convert whole columns once
        for name in (c.prompt_field, c.chosen_field, c.rejected_field, "chosen_model", "rejected_model", "source"):
            rows.column(name)
    kept = []
    for i in slow:
        prompt, chosen, rejected = (rows.value(n, i) for n in (c.prompt_field, c.chosen_field, c.rejected_field))
        if rows.fmt == "csv":  # message lists are JSON text in a CSV cell
            prompt, chosen, rejected = text_or_json(prompt), text_or_json(chosen), text_or_json(rejected)
        try:
            prompt, good, worse = split_pair(prompt, chosen, rejected, c)
        except BadRow as exc:
            bad.append(quarantine_row(rows.path, rows.fmt, rows.numbers[i], rows.raw(i), exc))
            continue
        source = rows.value("source", i)
        kept.append({"i": i, "row": rows.numbers[i], "prompt": prompt, "good": good, "worse": worse,
                     "gen_c": rows.value("chosen_model", i), "gen_r": rows.value("rejected_model", i),
                     "source": source if isinstance(source, str) else None})
    frame = pl.concat([f for f in (fast, pl.DataFrame(kept, schema=PAIRS)) if f is not None])
    frame = frame.with_columns(pl.col("gen_c").fill_null("original"), pl.col("gen_r").fill_null("original"),
                               pl.lit(c.source).fill_null(pl.col("source")).fill_null(pl.lit(rows.path.name))
                               .alias("source"))
    return _control_text(frame, rows, c, bad)


def _control_text(frame: pl.DataFrame, rows: Rows, c: ImportPairsConfig, bad: list) -> tuple[pl.DataFrame, list]:
    """Mark (``control``), escape or quarantine the pairs whose texts hold chat-control markers."""
    contents = pl.element().struct.field("content")
    found = (pl.col("prompt").list.eval(contents.str.contains(CONTROL_PATTERN)).list.any()
             | pl.col("good").str.contains(CONTROL_PATTERN) | pl.col("worse").str.contains(CONTROL_PATTERN))
    frame = frame.with_columns(found.fill_null(False).alias("control"))
    if c.special_tokens == "escape":
        frame = frame.with_columns(
            pl.col("prompt").list.eval(pl.struct(pl.element().struct.field("role"),
                                                 contents.str.replace_all(CONTROL_PATTERN, ESCAPED))),
            pl.col("good").str.replace_all(CONTROL_PATTERN, ESCAPED),
            pl.col("worse").str.replace_all(CONTROL_PATTERN, ESCAPED))
    elif c.special_tokens == "quarantine" and frame["control"].any():
        guard = ControlText("quarantine")
        for r in frame.filter("control").iter_rows(named=True):
            try:
                guard.messages(r["prompt"], "prompt")
                guard.text(r["good"], c.chosen_field)
                guard.text(r["worse"], c.rejected_field)
            except BadRow as exc:
                bad.append(quarantine_row(rows.path, rows.fmt, r["row"], rows.raw(r["i"]), exc))
        frame = frame.filter(~pl.col("control"))
    return frame, bad


# -- one pair ---------------------------------------------------------------------------
def split_pair(prompt: Any, chosen: Any, rejected: Any, c: ImportPairsConfig) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) of one row, or BadRow."""
    prompt, good, worse = _split(prompt, chosen, rejected, c)
    if good == worse:
        raise BadRow("identical_responses", f"{c.chosen_field}/{c.rejected_field}",
                     "chosen and rejected are the same text", "remove the pair; it compares nothing")
    return prompt, good, worse


def _split(prompt: Any, chosen: Any, rejected: Any, c: ImportPairsConfig) -> tuple[list[dict], str, str]:
    for value, name in ((chosen, c.chosen_field), (rejected, c.rejected_field)):
        if value is None:
            raise BadRow("missing_field", name, "the value is missing or null", "give the row both completions")
    fmt = c.format if c.format != "auto" else _detect(prompt, chosen)
    if fmt == "hh_transcript":
        good = _transcript(chosen, c.chosen_field)
        return _shared_prefix(good, _rejected_transcript(chosen, rejected, good, c), c)
    if fmt == "trl_standard":
        if prompt is None:
            raise BadRow("missing_field", c.prompt_field, "the prompt is missing or null", "give the row a prompt")
        prompt = [{"role": "user", "content": _string(prompt, c.prompt_field)}]
        _check_prompt(prompt, c.prompt_field)
        return prompt, _response(_string(chosen, c.chosen_field), c.chosen_field), \
            _response(_string(rejected, c.rejected_field), c.rejected_field)
    good, worse = _messages(chosen, c.chosen_field), _messages(rejected, c.rejected_field)
    if prompt is None:  # implicit prompt: two whole conversations
        return _shared_prefix(good, worse, c)
    prompt = _messages(prompt, c.prompt_field) if not isinstance(prompt, str) else \
        [{"role": "user", "content": prompt}]
    _check_prompt(prompt, c.prompt_field)
    return prompt, _completion(good, c.chosen_field), _completion(worse, c.rejected_field)


def _detect(prompt: Any, chosen: Any) -> str:
    if isinstance(chosen, (list, tuple)):
        return "trl_conversational"
    if prompt is not None:
        return "trl_standard"
    return "hh_transcript"


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadRow("bad_type", field, f"expected a string, got {type(value).__name__}",
                     "use one format per file, or set `format:`")
    return value


def _response(text: str, field: str) -> str:
    if not text.strip():
        raise BadRow("empty_response", field, "the response is empty or only whitespace",
                     "remove the pair or give it a response")
    return text


def _messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        raise BadRow("bad_type", field, f"expected a list of messages, got {type(value).__name__}",
                     "use one format per file, or set `format:`")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise BadRow("bad_message", f"{field}[{j}]", f"a message must be an object with a role in {list(ROLES)}"
                         f" and a string content, got {m!r}"[:300])
        if not isinstance(m.get("content"), str):
            raise BadRow("bad_content", f"{field}[{j}].content",
                         f"content must be a string, got {type(m.get('content')).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _completion(messages: list[dict], field: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise BadRow("bad_completion", field, f"with an explicit prompt a completion must be one assistant "
                     f"message, got roles {[m['role'] for m in messages]}",
                     "drop the prompt column to use the implicit-prompt layout, or fix the row")
    return _response(messages[0]["content"], f"{field}[0].content")


def _transcript(text: Any, field: str) -> list[dict]:
    text = _string(text, field)
    parts = HH_TURN.split(text)
    if len(parts) < 3:
        raise BadRow("bad_transcript", field, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found",
                     "give an HH-style transcript, or set `format:`")
    if parts[0].strip():
        raise BadRow("bad_transcript", field, f"text before the first turn: {parts[0][:60]!r}",
                     "start the transcript with '\\n\\nHuman: '")
    return [{"role": HH_ROLES[parts[k]], "content": parts[k + 1]} for k in range(1, len(parts), 2)]


def _rejected_transcript(chosen: str, rejected: Any, good: list[dict], c: ImportPairsConfig) -> list[dict]:
    """Split ``rejected``; when it repeats chosen's text up to the last reply, split only its tail."""
    pos = chosen.rfind("\n\nAssistant:")
    if pos > 0 and isinstance(rejected, str) and rejected.startswith(chosen[: pos + 12]):
        tail = HH_TURN.split(rejected[pos:])
        if len(tail) == 3:
            return good[:-1] + [{"role": "assistant", "content": tail[2]}]
    return _transcript(rejected, c.rejected_field)


def _shared_prefix(good: list[dict], worse: list[dict], c: ImportPairsConfig) -> tuple[list[dict], str, str]:
    for messages, name in ((good, c.chosen_field), (worse, c.rejected_field)):
        if not messages or messages[-1]["role"] != "assistant":
            raise BadRow("bad_last_turn", name, "the conversation does not end with an assistant reply",
                         "end both conversations with the reply being compared")
    if good[:-1] != worse[:-1]:
        k = next((j for j, (a, b) in enumerate(zip(good[:-1], worse[:-1])) if a != b), min(len(good), len(worse)) - 1)
        raise BadRow("prefix_mismatch", f"{c.chosen_field}/{c.rejected_field}",
                     f"the two conversations differ before their last assistant reply (first at turn {k}, "
                     f"{len(good) - 1} vs {len(worse) - 1} prompt turns), so there is no shared prompt",
                     "a pair must compare two replies to one conversation; fix or remove it")
    prompt = good[:-1]
    _check_prompt(prompt, c.chosen_field)
    return prompt, _response(good[-1]["content"], c.chosen_field), _response(worse[-1]["content"], c.rejected_field)


def _check_prompt(messages: list[dict], field: str) -> None:
    if not messages:
        raise BadRow("empty_prompt", field, "there is no prompt (no turn before the reply)",
                     "give the conversation a user turn")
    for j, m in enumerate(messages):
        if not m["content"].strip():
            raise BadRow("empty_prompt", f"{field}[{j}]", "a prompt message is empty or only whitespace",
                         "give it some text")
        if m["role"] == "system" and j:
            raise BadRow("misplaced_system", field, "a system message may only be the first message")
    if messages[-1]["role"] not in ("user", "tool"):
        raise BadRow("bad_last_turn", field, f"the prompt ends with a '{messages[-1]['role']}' message; "
                     "a prompt must end with a user or tool message", "fix the conversation")


# -- HH transcripts, vectorised ------------------------------------------------------------
def _hh_fast(rows: Rows, c: ImportPairsConfig) -> tuple[pl.DataFrame | None, Any]:
    """Split the plain HH rows with polars; return them and the positions left for the row loop.

    A row takes this path only when nothing about it needs a message: both transcripts are
    strings, share their text up to chosen's last "\n\nAssistant:", have no other turn
    after it, parse from the first character, end the prompt with a user turn, and hold
    no blank text, no control characters, and different replies. Everything else (and
    every bad row) goes through ``split_pair``, which says what is wrong.
    """
    t = rows.table
    everything = range(len(rows))
    if (t is None or c.format not in ("hh_transcript", "auto") or not len(rows)
            or (c.format == "auto" and c.prompt_field in t.column_names)):
        return None, everything
    names = [c.chosen_field, c.rejected_field]
    if not all(pa.types.is_string(t.schema.field(n).type) or pa.types.is_large_string(t.schema.field(n).type)
               for n in names):
        return None, everything
    df = pl.from_arrow(t.select(names)).rename({c.chosen_field: "c", c.rejected_field: "r"}).with_row_index("i")
    marker = "\n\nAssistant:"
    cut = {}
    for col in ("c", "r"):  # text up to the last marker, and the reply after it (one space dropped)
        turns = pl.col(col).str.split(marker, literal=True)
        cut[f"{col}_head"] = turns.list.slice(0, turns.list.len() - 1).list.join(marker)
        cut[f"{col}_reply"] = turns.list.last().str.strip_prefix(" ")
    df = df.with_columns(**cut).rename({"c_head": "head", "c_reply": "good", "r_reply": "worse"})
    parts = pl.col("head").str.replace_all(HH_TURN.pattern, "\x00${1}\x01").str.split("\x00")
    element = pl.element().str.split_exact("\x01", 1).struct
    messages = parts.list.slice(1).list.eval(pl.struct(
        element.field("field_0").replace_strict(HH_ROLES, default=None).alias("role"),
        element.field("field_1").alias("content")))
    df = df.with_columns(lead=parts.list.first(), prompt=messages)
    blank = pl.element().struct.field("content").str.strip_chars().str.len_chars() == 0
    ok = (
        pl.col("head").is_not_null() & (pl.col("head") == pl.col("r_head"))
        & (pl.col("lead") == "") & (pl.col("prompt").list.len() > 0)
        & (pl.col("prompt").list.last().struct.field("role") == "user")
        & ~pl.col("prompt").list.eval(blank).list.any()
        & ~pl.col("c").str.contains(ASCII_CONTROL) & ~pl.col("r").str.contains(ASCII_CONTROL)
        & ~pl.col("good").str.contains(HH_TURN.pattern) & ~pl.col("worse").str.contains(HH_TURN.pattern)
        & (pl.col("good").str.strip_chars().str.len_chars() > 0)
        & (pl.col("worse").str.strip_chars().str.len_chars() > 0) & (pl.col("good") != pl.col("worse"))
    ).fill_null(False)
    df = df.with_columns(ok.alias("ok"))
    slow = df.filter(~pl.col("ok"))["i"].to_list()
    df = df.filter(pl.col("ok"))
    first = rows.numbers[0]
    extra = {}
    for name, alias in (("chosen_model", "gen_c"), ("rejected_model", "gen_r"), ("source", "source")):
        if name in t.column_names and pa.types.is_string(t.schema.field(name).type):
            extra[alias] = pl.from_arrow(t.select([name])).to_series().gather(df["i"])
        else:
            extra[alias] = pl.Series(alias, [None] * df.height, pl.String)
    fast = df.select(pl.col("i").cast(pl.Int64), (pl.col("i").cast(pl.Int64) + first).alias("row"),
                     "prompt", "good", "worse")
    fast = fast.with_columns(**{k: v.alias(k) for k, v in extra.items()}).select(list(PAIRS))
    return fast.cast(PAIRS), slow


# -- the response table -----------------------------------------------------------------
def response_rows(pairs: pl.DataFrame) -> pa.Table:
    """Two response rows per pair (chosen, rejected), pairs in the order given; ``pid`` and
    ``k`` (the pair's number among its prompt's pairs) already set."""
    pairs = pairs.with_row_index("pos")
    sides = []
    for side, text, gen in ((0, "good", "gen_c"), (1, "worse", "gen_r")):
        sides.append(pairs.select(
            "pos", "pid", "prompt", "source", "row", pl.lit(side, pl.Int64).alias("side"),
            pl.col(text).alias("response"), pl.col(gen).alias("generator"),
            (2 * pl.col("k").cast(pl.Int64) + side).alias("sample_index")))
    long = pl.concat(sides).sort(["pos", "side"])
    key = pl.concat_str([pl.lit("["), _json_str(pl.col("pid")), pl.lit(","), _json_str(pl.col("generator")),
                         pl.lit(","), pl.col("sample_index").cast(pl.String), pl.lit(","),
                         _json_str(pl.col("response")), pl.lit("]")])
    rids = _ids(long.select(key).to_series(), long.select("pid", "generator", "response", "sample_index"),
                lambda r: response_id(*r[:3], r[3]))
    pair_key = pl.concat_str([pl.lit('["'), pl.col("rid"), pl.lit('","'), pl.col("rid").shift(-1).fill_null(""), pl.lit('"]')])
    long = long.with_columns(rid=rids)
    opairs = _ids(long.select(pair_key).to_series(), None, None).gather(
        (pl.int_range(long.height, eager=True) // 2) * 2)
    n = long.height
    table = pa.table({
        "prompt_id": long["pid"].to_arrow().cast(pa.string()),
        "prompt": _arrow(long["prompt"], MESSAGES),
        "source": long["source"].to_arrow().cast(pa.string()),
        "response_id": long["rid"].to_arrow().cast(pa.string()),
        "response": long["response"].to_arrow().cast(pa.string()),
        "generator": long["generator"].to_arrow().cast(pa.string()),
        "sample_index": long["sample_index"].to_arrow().cast(pa.int64()),
        "sampling": pa.nulls(n, SAMPLING),
        "score_original": pa.array(np.tile([1.0, 0.0], n // 2), pa.float64()),
        "label_source": pa.repeat(pa.scalar("original", pa.string()), n),
        "original_pair": opairs.to_arrow().cast(pa.string()),
        "original_role": pa.array(np.tile(np.array(["chosen", "rejected"], object), n // 2), pa.string()),
        "original_row": long["row"].to_arrow().cast(pa.int64()),
    })
    return table


def _arrow(series: pl.Series, type_: pa.DataType) -> pa.Array:
    return series.to_arrow().cast(type_) if len(series) else pa.array([], type_)


ASCII_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f]"


def _json_str(expr: pl.Expr) -> pl.Expr:
    """The JSON text json.dumps(ensure_ascii=False) writes for a string without control characters."""
    escaped = (expr.str.replace_all("\\", "\\\\", literal=True).str.replace_all('"', '\\"', literal=True)
               .str.replace_all("\n", "\\n", literal=True).str.replace_all("\r", "\\r", literal=True)
               .str.replace_all("\t", "\\t", literal=True))
    return pl.concat_str([pl.lit('"'), escaped, pl.lit('"')])


def _json_messages(column: str) -> pl.Expr:
    one = pl.concat_str([pl.lit("["), _json_str(pl.element().struct.field("role")), pl.lit(","),
                         _json_str(pl.element().struct.field("content")), pl.lit("]")])
    return pl.concat_str([pl.lit("["), pl.col(column).list.eval(one).list.join(","), pl.lit("]")])


def _ids(texts: pl.Series, values, exact) -> pl.Series:
    """sha256 ids of JSON texts; rows holding control characters are hashed from ``values`` exactly."""
    out = [_sha(t) for t in texts.to_list()]
    if exact is not None:
        odd = texts.str.contains(ASCII_CONTROL).fill_null(True).arg_true().to_list()
        if odd:
            for j in odd:
                out[j] = exact(values[j] if isinstance(values, pl.Series) else values.row(j))
    return pl.Series(out, dtype=pl.String)


# schema.prompt_id / response_id / pair_id, with the same JSON text written directly
# (json.dumps of a list with ensure_ascii=False and compact separators): the same ids, ~3x faster
def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def prompt_id(messages: list[dict]) -> str:
    return _sha("[" + ",".join(f"[{_enc(m['role'])},{_enc(m['content'])}]" for m in messages) + "]")


def response_id(prompt_id_: str, generator: str, text: str, sample_index: int) -> str:
    return _sha(f"[{_enc(prompt_id_)},{_enc(generator)},{int(sample_index)},{_enc(text)}]")


def pair_id(chosen_id: str, rejected_id: str) -> str:
    return _sha(f"[{_enc(chosen_id)},{_enc(rejected_id)}]")
