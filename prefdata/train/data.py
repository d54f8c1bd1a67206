"""Training data: the pipeline's pair or list parquet, tokenised with the model's chat template.

Pairs use TRL's conversational columns (``prompt``, ``chosen``, ``rejected`` as message
lists); lists use ``prompt``, ``responses`` (one assistant message each, best first) and
``scores``. Each example becomes prompt token ids plus one id list per response.
Truncation keeps the prompt's end (to ``max_prompt_length``) and the responses' start (so
that prompt + response fits ``max_length``); what was cut is counted. Batches are grouped
by length so that padded micro-batches waste little. The eval split takes whole prompts
(``prompt_id``), so no prompt is in both splits; a table from the ``curriculum`` step is
trained in its ``curriculum_order``, iteration by iteration.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
LIST_COLUMNS = ("prompt", "responses", "scores")


class DataError(ValueError):
    """Training data that cannot be used as it is; the message says where and what to do."""


@dataclass
class Examples:
    kind: str                              # "pairs" | "lists"
    prompts: list[list[int]]
    responses: list[list[list[int]]]       # best first; pairs: [chosen, rejected]
    ids: list[str]                         # pair_id (or row number)
    scores: list[list[float]] | None = None
    flip_prob: list[float] | None = None
    label_prob: list[float] | None = None  # build_pairs' Bradley–Terry soft label, P(chosen ≻ rejected)
    groups: list[str] = field(default_factory=list)     # prompt_id (or the prompt's tokens): eval split unit
    iteration: np.ndarray | None = None    # curriculum iteration and order, when the data has them
    order: np.ndarray | None = None
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""                  # hash of every token id: data, template, truncation

    def __len__(self) -> int:
        return len(self.prompts)

    def row(self, i: int) -> tuple[list[int], list[list[int]]]:
        return self.prompts[i], self.responses[i]

    def lengths(self) -> np.ndarray:
        """Packed length (prompt + all responses) of every example."""
        return np.array([len(p) + sum(map(len, r)) for p, r in zip(self.prompts, self.responses)])


def load_examples(path: str | Path, tokenizer, max_length: int,
                  max_prompt_length: int | None = None) -> Examples:
    """Read and tokenise a pair or list parquet; raise DataError on anything unusable."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"the tokenizer has no chat template, so {path}'s conversational columns cannot be "
            "rendered; train from an instruct/chat model or set tokenizer.chat_template"
        )
    names = pq.read_schema(path).names if path.is_file() else pq.read_table(path).schema.names
    if all(c in names for c in PAIR_COLUMNS):
        kind, columns = "pairs", list(PAIR_COLUMNS)
    elif all(c in names for c in LIST_COLUMNS):
        kind, columns = "lists", list(LIST_COLUMNS)
    else:
        missing_pairs = [c for c in PAIR_COLUMNS if c not in names]
        missing_lists = [c for c in LIST_COLUMNS if c not in names]
        raise DataError(
            f"{path}: missing column(s) {missing_pairs} for a pair file (needs {list(PAIR_COLUMNS)}) "
            f"or {missing_lists} for a list file (needs {list(LIST_COLUMNS)}); found {names}. "
            "Point --data at the output of the pipeline's build step."
        )
    extra = [c for c in ("pair_id", "prompt_id", "score_chosen", "score_rejected", "flip_prob", "label_prob",
                         "iteration", "curriculum_order") if c in names]
    table = pq.read_table(path, columns=columns + extra)
    rows = table.to_pydict()
    n = table.num_rows
    if n == 0:
        raise DataError(f"{path}: the file has no rows")
    ids = [str(x) for x in rows["pair_id"]] if "pair_id" in rows else [str(i) for i in range(n)]

    stats = {"rows": n, "prompts_truncated": 0, "responses_truncated": 0, "tokens_cut": 0}
    prompts, responses, too_long, groups = [], [], [], []
    for i in range(n):
        where = f"{path}, row {i} ({'pair_id=' + ids[i] if 'pair_id' in rows else 'no pair_id'})"
        prompt = _messages(rows["prompt"][i], "prompt", where)
        if kind == "pairs":
            answers = [_messages(rows["chosen"][i], "chosen", where),
                       _messages(rows["rejected"][i], "rejected", where)]
        else:
            listed = rows["responses"][i] or []
            if len(listed) < 2:
                raise DataError(f"{where}: 'responses' has {len(listed)} response(s); a ranked list needs >= 2")
            answers = [_messages([m], f"responses[{j}]", where) for j, m in enumerate(listed)]
        p_ids, r_ids = _tokenize(tokenizer, prompt, answers)
        if max_prompt_length is not None and len(p_ids) > max_prompt_length:
            stats["prompts_truncated"] += 1
            stats["tokens_cut"] += len(p_ids) - max_prompt_length
            p_ids = p_ids[-max_prompt_length:]
        if len(p_ids) >= max_length:
            too_long.append((i, len(p_ids)))
            continue
        room = max_length - len(p_ids)
        for j, r in enumerate(r_ids):
            if len(r) == 0:
                raise DataError(f"{where}: response {j} renders to no tokens after the prompt")
            if len(r) > room:
                stats["responses_truncated"] += 1
                stats["tokens_cut"] += len(r) - room
                r_ids[j] = r[:room]
        prompts.append(p_ids)
        responses.append(r_ids)
        groups.append(str(rows["prompt_id"][i]) if "prompt_id" in rows else _token_key(p_ids))
    if too_long:
        first = ", ".join(f"row {i} ({t} tokens)" for i, t in too_long[:5])
        raise DataError(
            f"{path}: {len(too_long)} prompt(s) leave no room for a response within max_length="
            f"{max_length}: {first}{' …' if len(too_long) > 5 else ''}. Raise max_length, or set "
            "max_prompt_length (< max_length) to keep only the end of long prompts."
        )

    ex = Examples(kind=kind, prompts=prompts, responses=responses, ids=ids, stats=stats, groups=groups)
    if "curriculum_order" in rows and "iteration" in rows:
        ex.order = _complete(rows["curriculum_order"], "curriculum_order", path)
        ex.iteration = _complete(rows["iteration"], "iteration", path)
    if kind == "lists":
        ex.scores = [list(map(float, s or [])) for s in rows["scores"]]
        bad = [i for i, (s, r) in enumerate(zip(ex.scores, responses)) if len(s) != len(r)]
        if bad:
            raise DataError(f"{path}: row {bad[0]}: 'scores' and 'responses' have different lengths")
    elif "score_chosen" in rows and "score_rejected" in rows:
        pairs = list(zip(rows["score_chosen"], rows["score_rejected"]))
        if all(c is not None and r is not None for c, r in pairs):
            ex.scores = [[float(c), float(r)] for c, r in pairs]
    if "flip_prob" in rows:
        fp = rows["flip_prob"]
        nulls = [i for i, x in enumerate(fp) if x is None]
        if nulls:
            ex.flip_prob = None
            stats["flip_prob_nulls"] = len(nulls)
        else:
            ex.flip_prob = [float(x) for x in fp]
    if "label_prob" in rows:
        lp = rows["label_prob"]
        nulls = [i for i, x in enumerate(lp) if x is None]
        ex.label_prob = None if nulls else [float(x) for x in lp]
        if nulls:
            stats["label_prob_nulls"] = len(nulls)
    lengths = ex.lengths()
    stats.update(mean_packed_tokens=float(lengths.mean()), max_packed_tokens=int(lengths.max()))
    ex.fingerprint = _fingerprint(ex)
    return ex


def _complete(values: list, column: str, path) -> np.ndarray:
    nulls = [i for i, v in enumerate(values) if v is None]
    if nulls:
        raise DataError(f"{path}: '{column}' is empty in {len(nulls)} row(s) (first: row {nulls[0]}); "
                        "re-run the curriculum step, or set order: shuffle")
    return np.asarray(values, dtype=np.int64)


def _token_key(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def subset(ex: Examples, keep: np.ndarray, flip: np.ndarray | None = None) -> Examples:
    """The examples where ``keep``, with chosen and rejected swapped where ``flip`` (pairs)."""
    flip = np.zeros(len(ex), bool) if flip is None else flip
    idx = np.flatnonzero(keep)

    def pick(values):
        return None if values is None else [values[i] for i in idx]

    out = Examples(kind=ex.kind, prompts=pick(ex.prompts), ids=pick(ex.ids), groups=pick(ex.groups),
                   responses=[ex.responses[i][::-1] if flip[i] else ex.responses[i] for i in idx],
                   scores=None if ex.scores is None else [ex.scores[i][::-1] if flip[i] else ex.scores[i] for i in idx],
                   flip_prob=None if ex.flip_prob is None else
                   [1.0 - ex.flip_prob[i] if flip[i] else ex.flip_prob[i] for i in idx],
                   label_prob=None if ex.label_prob is None else
                   [1.0 - ex.label_prob[i] if flip[i] else ex.label_prob[i] for i in idx],
                   iteration=None if ex.iteration is None else ex.iteration[idx],
                   order=None if ex.order is None else ex.order[idx], stats=dict(ex.stats))
    out.fingerprint = _fingerprint(out)
    return out


def with_ld_prefix(ex: Examples) -> Examples:
    """LD-DPO's data: each pair whose responses differ in length gets a third response, the
    longer one's first l_p = min(|y_w|, |y_l|) tokens, whose summed log-prob (causal, so the
    same as over those positions of the full response) is the "public" part of the loss.
    The packed forward then reads up to l_p more tokens per pair (the prompt stays shared):
    the price of keeping one log-prob path (sums per response) for every loss."""
    responses = []
    for rs in ex.responses:
        c, r = rs[0], rs[1]
        responses.append([c, r] if len(c) == len(r) else [c, r, (c if len(c) > len(r) else r)[:min(len(c), len(r))]])
    out = Examples(**{**ex.__dict__, "responses": responses})
    out.fingerprint = _fingerprint(out)
    return out


def require_label_prob(ex: Examples, cfg, path) -> None:
    """cDPO/rDPO with per-pair soft labels need every pair's label_prob."""
    if ex.label_prob is None:
        why = "has nulls" if ex.stats.get("label_prob_nulls") else "is missing"
        raise DataError(f"{path}: the 'label_prob' column {why}; loss {cfg.loss} with "
                        f"{'label_smoothing' if cfg.loss == 'cdpo' else 'rdpo_eps'}: label_prob reads each pair's soft "
                        "label. Build the pairs with build_pairs with label_prob: true, or set a number")


def _messages(value, column: str, where: str) -> list[dict]:
    """A non-empty message list whose last message has text."""
    if value is None or len(value) == 0:
        raise DataError(f"{where}: '{column}' is empty; every example needs a {column} message list")
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: '{column}' must be a list of {{role, content}} messages, got {m!r}")
    if column != "prompt" and not (value[-1]["content"] or "").strip():
        raise DataError(f"{where}: '{column}' has empty content; drop the row or regenerate the response")
    return [{"role": m["role"], "content": m["content"] or ""} for m in value]


def _tokenize(tokenizer, prompt: list[dict], answers: list[list[dict]]):
    """Prompt ids (with the generation prompt) and each answer's ids after the shared prefix.

    The answer starts where the tokenised prompt and prompt+answer diverge (as TRL does),
    so the prompt ids are the common prefix of all renderings.
    """
    def ids(messages, gen):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    p = ids(prompt, True)
    full = [ids(prompt + a, False) for a in answers]
    cut = len(p)
    for f in full:
        cut = min(cut, _common_prefix(p, f))
    return p[:cut], [f[cut:] for f in full]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _fingerprint(ex: Examples) -> str:
    h = hashlib.sha256(ex.kind.encode())
    for p, rs in zip(ex.prompts, ex.responses):
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")
        for r in rs:
            h.update(np.asarray(r, dtype=np.int64).tobytes() + b";")
    return h.hexdigest()[:16]


def split_eval(groups: list[str], fraction: float, max_eval: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and eval row indices: whole prompts (``groups``) drawn at random until about
    ``fraction`` of the rows (at most ``max_eval``, give or take one prompt) are eval rows;
    no prompt is in both, so eval measures prompts the policy has not trained on."""
    n = len(groups)
    target = min(int(round(n * fraction)), max_eval) if fraction > 0 else 0
    keys, inverse, sizes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True,
                                     return_counts=True)
    if target == 0 or len(keys) < 2:
        return np.arange(n), np.arange(0)
    drawn = np.random.default_rng(seed).permutation(len(keys))
    taken = np.cumsum(sizes[drawn])
    n_groups = min(int(np.searchsorted(taken, target)) + 1, len(keys) - 1)
    is_eval = np.isin(inverse, drawn[:n_groups])
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


def epoch_batches(indices: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int,
                  epoch: int, group_by_length: bool = True) -> list[np.ndarray]:
    """The batches of one epoch: a seeded shuffle, then length-grouped within mega-batches.

    Mega-batches of 50 batches are sorted by length and cut into batches, and the batches
    are shuffled again — as transformers' LengthGroupedSampler does.
    """
    rng = np.random.default_rng([seed, epoch])
    order = indices[rng.permutation(len(indices))]
    if group_by_length:
        mega = batch_size * 50
        chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def curriculum_batches(indices: np.ndarray, iteration: np.ndarray, order: np.ndarray, batch_size: int,
                       seed: int, epoch: int, shuffle_within: bool = False) -> list[np.ndarray]:
    """The batches of one epoch in curriculum order: iteration by iteration, each in its
    ``curriculum_order`` (or a seeded shuffle); a batch never mixes two iterations."""
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for it in np.unique(iteration[indices]):
        members = indices[iteration[indices] == it]
        members = rng.permutation(members) if shuffle_within else members[np.argsort(order[members], kind="stable")]
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    return batches


def micro_batches(batch: np.ndarray, lengths: np.ndarray, size: int) -> list[np.ndarray]:
    """Split a batch into forward passes of ``size`` rows, longest together."""
    order = batch[np.argsort(-lengths[batch], kind="stable")]
    return [order[i:i + size] for i in range(0, len(order), size)]
