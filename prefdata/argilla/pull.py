"""Pull human labels from Argilla and merge them into the pairs (see ``merge`` for the rules).

Records and their responses are read through the SDK's record iterator; user ids are
turned into user names (``annotators`` holds names a person recognises), falling back to
the id, with a warning, where the key may not list users.

Known limit of the argilla SDK 2.8: a response discarded with no answer at all carries no
values, and the SDK represents responses only through their values, so such a discard is
not seen here (``discarded_count`` counts discards that kept an answer). A submitted
response always has a value and is never missed.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import pyarrow as pa

from prefdata.argilla.client import DatasetMissing, connect, with_retries
from prefdata.argilla.dataset import QUESTION, RATIONALE, DatasetConfig, iter_records, lookup
from prefdata.argilla.merge import ANNOTATIONS, MergeConfig, merge
from prefdata.step import Output

log = logging.getLogger(__name__)


@dataclass
class PullConfig(DatasetConfig, MergeConfig):
    retries: int = 8


def user_names(client, retries: int = 8) -> dict[str, str]:
    """{user id: user name} for every user the key may list; empty (ids are kept) otherwise."""
    try:
        users = with_retries(lambda: list(client.users), retries, "listing users", client.api_url)
    except Exception as exc:  # an admin key may not list users: names are a convenience, not a must
        log.warning("cannot list users at %s (%s); annotators are given as user ids", client.api_url, exc)
        return {}
    return {str(user.id): user.username for user in users}


def fetch_annotations(cfg: DatasetConfig | None = None, client=None, retries: int = 8) -> pa.Table:
    """One row per (record, annotator); a record without responses gives one row with nulls."""
    cfg = cfg or DatasetConfig()
    client = client or connect()
    dataset = lookup(client, cfg, retries)
    if dataset is None:
        raise DatasetMissing(f"no dataset '{cfg.workspace}/{cfg.dataset}' at {client.api_url}; push first")
    names = user_names(client, retries)
    rows = {name: [] for name in ANNOTATIONS.names}
    with warnings.catch_warnings():  # the SDK warns on every response it cannot attach a user to
        warnings.simplefilter("ignore", UserWarning)
        for record in iter_records(dataset, client.api_url, retries, with_responses=True):
            a_is = record.metadata.to_dict().get("a_is")
            by_user = _responses_by_user(record)
            for rank, (user_id, answer) in enumerate(by_user.items()):
                _add(rows, record.id, a_is, names.get(user_id, user_id), answer, rank)
            if not by_user:
                _add(rows, record.id, a_is, None, None, None)
    return pa.table(rows, schema=ANNOTATIONS)


def _responses_by_user(record) -> dict[str, dict]:
    """{user id: {status, label, rationale}} in the server's order (earliest response first)."""
    out: dict[str, dict] = {}
    for response in record.responses:
        answer = out.setdefault(str(response.user_id), {"status": _status(response.status)})
        if response.question_name == QUESTION:
            answer["label"] = response.value
        elif response.question_name == RATIONALE:
            answer["rationale"] = response.value
    return out


def _status(status) -> str | None:
    return getattr(status, "value", status)


def _add(rows: dict, pair_id, a_is, user, answer: dict | None, rank: int | None) -> None:
    answer = answer or {}
    rows["pair_id"].append(str(pair_id))
    rows["a_is"].append(a_is)
    rows["user"].append(user)
    rows["status"].append(answer.get("status"))
    rows["label"].append(answer.get("label"))
    rows["rationale"].append(answer.get("rationale"))
    rows["rank"].append(rank)


def pull(pairs: pa.Table, cfg: PullConfig | None = None, client=None) -> Output:
    """Fetch the human labels of ``cfg.dataset`` and merge them into ``pairs``."""
    cfg = cfg or PullConfig()
    return merge(pairs, fetch_annotations(cfg, client, cfg.retries), cfg)
