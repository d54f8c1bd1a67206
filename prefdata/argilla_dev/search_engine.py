"""An in-process search engine for argilla-server, so the dev server needs no Elasticsearch.

This file runs inside the argilla-server virtual environment (it imports ``argilla_server``
and the standard library only); the launcher loads it by path and it registers itself
through argilla-server's plug-in point, ``SearchEngine.register(ENGINE_NAME)``; the server
picks it with ``ARGILLA_SEARCH_ENGINE=inprocess``.

Documents mirror what argilla-server's Elasticsearch engine indexes (fields, metadata,
responses, suggestions, vectors, record status). They are kept as JSON in a SQLite file
(``$PREFDATA_SEARCH_INDEX``), so the server and an rq worker process share one index and
it outlives a restart. Argilla commits a record to its own database *before* indexing it,
so a crash in between can leave the index behind the database: the launcher then calls
``rebuild_index`` before serving. Queries (text, filters, sort, metrics, similarity) are
answered by scanning one dataset's documents in Python, which is fine at dev-server scale
(a few tens of thousands of records).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
from datetime import datetime
from typing import Any, Iterable, List, Optional, Union
from uuid import UUID

from argilla_server.enums import MetadataPropertyType, ResponseStatusFilter, SimilarityOrder
from argilla_server.models import Dataset, MetadataProperty, Record, Response, Suggestion, User, VectorSettings
from argilla_server.search_engine.base import (
    AndFilter,
    Filter,
    FloatMetadataMetrics,
    IntegerMetadataMetrics,
    MetadataFilterScope,
    MetadataMetrics,
    Order,
    RangeFilter,
    RecordFilterScope,
    ResponseFilterScope,
    SearchEngine,
    SearchResponseItem,
    SearchResponses,
    SuggestionFilterScope,
    TermsFilter,
    TermsMetrics,
    TextQuery,
)

ENGINE_NAME = "inprocess"
INDEX_ENV = "PREFDATA_SEARCH_INDEX"
_TOKEN = re.compile(r"\w+", re.UNICODE)
_QUERY_PART = re.compile(r'(-?)"([^"]*)"|(\S+)')

_connection: Optional[tuple[int, sqlite3.Connection]] = None


# -- the document store -----------------------------------------------------------------------
def index_path() -> str:
    path = os.environ.get(INDEX_ENV)
    if not path:
        raise RuntimeError(f"the in-process search engine needs ${INDEX_ENV} (a path for its SQLite index)")
    return path


def _db() -> sqlite3.Connection:
    """One connection per process (an rq work-horse is forked, so it opens its own)."""
    global _connection
    if _connection is None or _connection[0] != os.getpid():
        conn = sqlite3.connect(index_path(), timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS docs (record_id TEXT PRIMARY KEY, dataset_id TEXT NOT NULL, doc TEXT NOT NULL)"
        )
        conn.execute("CREATE INDEX IF NOT EXISTS docs_dataset ON docs (dataset_id)")
        _connection = (os.getpid(), conn)
    return _connection[1]


def _put(docs: list[tuple[str, str, dict]]) -> None:
    db = _db()
    rows = [(rid, did, json.dumps(doc, default=_json_default)) for rid, did, doc in docs]
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany("INSERT OR REPLACE INTO docs (record_id, dataset_id, doc) VALUES (?, ?, ?)", rows)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _get(record_id: Any) -> Optional[tuple[str, dict]]:
    row = _db().execute("SELECT dataset_id, doc FROM docs WHERE record_id = ?", (str(record_id),)).fetchone()
    return (row[0], json.loads(row[1])) if row else None


def _update(record_id: Any, change) -> None:
    """Read-modify-write of one document; a record not (yet) indexed is left alone."""
    db = _db()
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT doc FROM docs WHERE record_id = ?", (str(record_id),)).fetchone()
        if row is not None:
            doc = json.loads(row[0])
            change(doc)
            db.execute("UPDATE docs SET doc = ? WHERE record_id = ?",
                       (json.dumps(doc, default=_json_default), str(record_id)))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _docs(dataset_id: Any) -> list[dict]:
    rows = _db().execute("SELECT doc FROM docs WHERE dataset_id = ?", (str(dataset_id),)).fetchall()
    return [json.loads(r[0]) for r in rows]


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if hasattr(value, "value"):  # enums
        return value.value
    raise TypeError(f"cannot index a value of type {type(value).__name__}")


# -- records to documents (the same shape argilla-server's Elasticsearch engine indexes) -------
def record_document(record: Record, dataset: Dataset) -> dict:
    fields = {}
    for field in dataset.fields:
        if field.is_image:
            continue
        value = (record.fields or {}).get(field.name)
        if field.is_custom and value is not None:
            value = str(value)
        fields[field.name] = value
    return {
        "id": str(record.id),
        "external_id": record.external_id,
        "fields": fields,
        "status": _plain(record.status),
        "inserted_at": record.inserted_at.isoformat() if record.inserted_at else None,
        "updated_at": record.updated_at.isoformat() if record.updated_at else None,
        "metadata": {k: v for k, v in (record.metadata_ or {}).items() if v is not None},
        "responses": [response_document(r) for r in record.responses],
        "suggestions": {s.question.name: suggestion_document(s) for s in record.suggestions},
        "vectors": {str(v.vector_settings_id): list(v.value) for v in record.vectors},
    }


def response_document(response: Response) -> dict:
    return {
        "id": str(response.id),
        "status": _plain(response.status),
        "user_id": str(response.user_id),
        "values": {q: (v or {}).get("value") for q, v in (response.values or {}).items()},
    }


def suggestion_document(suggestion: Suggestion) -> dict:
    return {"type": _plain(suggestion.type), "agent": suggestion.agent, "score": suggestion.score,
            "value": suggestion.value}


def _plain(value: Any) -> Any:
    return value.value if hasattr(value, "value") else value


# -- the engine -------------------------------------------------------------------------------
@SearchEngine.register(ENGINE_NAME)
class InProcessSearchEngine(SearchEngine):
    """Argilla's ``SearchEngine`` over a SQLite document store, queried in Python."""

    @classmethod
    async def new_instance(cls) -> "InProcessSearchEngine":
        return cls()

    async def close(self):
        pass

    async def ping(self) -> bool:
        _db().execute("SELECT 1").fetchone()
        return True

    async def info(self) -> dict:
        return {"engine": ENGINE_NAME, "index": index_path()}

    async def create_index(self, dataset: Dataset):
        pass  # documents are schema-less

    async def delete_index(self, dataset: Dataset):
        db = _db()
        db.execute("DELETE FROM docs WHERE dataset_id = ?", (str(dataset.id),))

    async def configure_metadata_property(self, dataset: Dataset, metadata_property: MetadataProperty):
        pass  # all metadata is stored; filters name the property

    async def configure_index_vectors(self, vector_settings: VectorSettings):
        pass

    async def index_records(self, dataset: Dataset, records: Iterable[Record]):
        _put([(str(r.id), str(dataset.id), record_document(r, dataset)) for r in records])

    async def partial_record_update(self, record: Record, **update):
        clean = json.loads(json.dumps(update, default=_json_default))
        _update(record.id, lambda doc: doc.update(clean))

    async def delete_records(self, dataset: Dataset, records: Iterable[Record]):
        ids = [(str(r.id),) for r in records]
        _db().executemany("DELETE FROM docs WHERE record_id = ?", ids)

    async def update_record_response(self, response: Response):
        new = response_document(response)

        def change(doc):
            doc["responses"] = [r for r in doc.get("responses", []) if r["id"] != new["id"]] + [new]

        _update(response.record_id, change)

    async def delete_record_response(self, response: Response):
        gone = str(response.id)
        _update(response.record_id,
                lambda doc: doc.update(responses=[r for r in doc.get("responses", []) if r["id"] != gone]))

    async def update_record_suggestion(self, suggestion: Suggestion):
        name, new = suggestion.question.name, suggestion_document(suggestion)
        _update(suggestion.record_id, lambda doc: doc.setdefault("suggestions", {}).__setitem__(name, new))

    async def delete_record_suggestion(self, suggestion: Suggestion):
        name = suggestion.question.name
        _update(suggestion.record_id, lambda doc: doc.setdefault("suggestions", {}).pop(name, None))

    async def get_dataset_progress(self, dataset: Dataset) -> dict:
        if dataset.is_draft:
            return {}
        counts: dict[str, int] = {}
        for doc in _docs(dataset.id):
            if doc.get("status") is not None:
                counts[doc["status"]] = counts.get(doc["status"], 0) + 1
        return {"total": sum(counts.values()), **counts}

    async def get_dataset_user_progress(self, dataset: Dataset, user: User) -> dict:
        if dataset.is_draft:
            return {}
        counts: dict[str, int] = {}
        for doc in _docs(dataset.id):
            for r in doc.get("responses", []):
                if r["user_id"] == str(user.id):
                    counts[r["status"]] = counts.get(r["status"], 0) + 1
        return {"total": sum(counts.values()), **counts}

    async def search(
        self,
        dataset: Dataset,
        query: Optional[Union[TextQuery, str]] = None,
        filter: Optional[Filter] = None,
        sort: Optional[List[Order]] = None,
        offset: int = 0,
        limit: int = 100,
        user_id: Optional[str] = None,
    ) -> SearchResponses:
        hits = _match(dataset, _docs(dataset.id), query, filter)
        if sort:
            hits = _sorted(hits, sort)
        elif query is not None:
            if user_id is not None:  # like Elasticsearch's random_score: a per-user shuffle
                hits = [(d, s * _user_random(user_id, d["id"])) for d, s in hits]
            hits.sort(key=lambda h: -h[1])
        elif user_id is not None:
            hits.sort(key=lambda h: _user_random(user_id, h[0]["id"]))
        page = hits[offset: offset + limit]
        return SearchResponses(items=[SearchResponseItem(record_id=UUID(d["id"]), score=s) for d, s in page],
                               total=len(hits))

    async def similarity_search(
        self,
        dataset: Dataset,
        vector_settings: VectorSettings,
        value: Optional[List[float]] = None,
        record: Optional[Record] = None,
        query: Optional[Union[TextQuery, str]] = None,
        filter: Optional[Filter] = None,
        max_results: int = 100,
        order: SimilarityOrder = SimilarityOrder.most_similar,
        threshold: Optional[float] = None,
    ) -> SearchResponses:
        if bool(value) == bool(record):
            raise ValueError("Must provide either vector value or record to compute the similarity search")
        key = str(vector_settings.id)
        excluded = None
        if not value:
            excluded = str(record.id)
            value = record.vector_value_by_vector_settings(vector_settings)
        if not value:
            raise ValueError("Cannot find a vector value to apply with provided info")
        if order == SimilarityOrder.least_similar:
            value = [-x for x in value]
        scored = []
        for doc, _ in _match(dataset, _docs(dataset.id), query, filter):
            vec = doc.get("vectors", {}).get(key)
            if vec is None or doc["id"] == excluded:
                continue
            score = _cosine(value, vec)
            if threshold is None or score >= threshold:
                scored.append((doc, score))
        scored.sort(key=lambda h: -h[1])
        scored = scored[:max_results]
        return SearchResponses(items=[SearchResponseItem(record_id=UUID(d["id"]), score=s) for d, s in scored],
                               total=len(scored))

    async def compute_metrics_for(self, metadata_property: MetadataProperty) -> MetadataMetrics:
        values = []
        for doc in _docs(metadata_property.dataset_id):
            v = doc.get("metadata", {}).get(metadata_property.name)
            values.extend(v if isinstance(v, list) else [] if v is None else [v])
        if metadata_property.type == MetadataPropertyType.terms:
            counts: dict[str, int] = {}
            for v in values:
                counts[str(v)] = counts.get(str(v), 0) + 1
            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            return TermsMetrics(total=len(values),
                                values=[TermsMetrics.TermCount(term=t, count=c) for t, c in ranked])
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        cls = IntegerMetadataMetrics if metadata_property.type == MetadataPropertyType.integer else FloatMetadataMetrics
        return cls(min=min(numbers) if numbers else None, max=max(numbers) if numbers else None)


# -- queries ----------------------------------------------------------------------------------
def _match(dataset: Dataset, docs: list[dict], query, filter) -> list[tuple[dict, float]]:
    text = _text_query(dataset, query)
    hits = []
    for doc in docs:
        if filter is not None and not _passes(doc, filter):
            continue
        score = 1.0 if text is None else _text_score(doc, *text)
        if score > 0:
            hits.append((doc, score))
    # documents come from the index in no order; the default is insertion order, like a fresh ES index
    hits.sort(key=lambda h: (h[0].get("inserted_at") or "", h[0]["id"]))
    return hits


def _text_query(dataset: Dataset, query) -> Optional[tuple[Optional[str], list]]:
    if query is None:
        return None
    if isinstance(query, str):
        query = TextQuery(q=query)
    if query.field and dataset.field_by_name(query.field) is None:
        raise Exception(f"Field {query.field} not found in dataset {dataset.id}")
    terms = []  # (negated, kind, value): kind is "phrase", "prefix" or "token"
    for m in _QUERY_PART.finditer(query.q):
        if m.group(2) is not None:
            terms.append((m.group(1) == "-", "phrase", m.group(2).lower()))
            continue
        raw = m.group(3)
        negated = raw.startswith("-") and len(raw) > 1
        raw = raw[1:] if negated or raw.startswith("+") else raw
        prefix = raw.endswith("*")
        for token in _TOKEN.findall(raw.lower()):
            terms.append((negated, "prefix" if prefix else "token", token))
    return query.field, terms


def _field_text(value: Any) -> str:
    if isinstance(value, list):  # a chat field: [{role, content}, ...]
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return "" if value is None else str(value)


def _text_score(doc: dict, field: Optional[str], terms: list) -> float:
    fields = doc.get("fields", {})
    text = _field_text(fields.get(field)) if field else "\n".join(_field_text(v) for v in fields.values())
    lowered = text.lower()
    tokens = _TOKEN.findall(lowered)
    score = 0.0
    for negated, kind, value in terms:
        if kind == "phrase":
            hits = lowered.count(value) if value else 0
        elif kind == "prefix":
            hits = sum(1 for t in tokens if t.startswith(value))
        else:
            hits = tokens.count(value)
        if negated and hits:
            return 0.0
        if not negated:
            if not hits:
                return 0.0
            score += 1.0 + math.log(hits)
    return score if terms else 1.0


def _passes(doc: dict, filter: Filter) -> bool:
    if isinstance(filter, AndFilter):
        return all(_passes(doc, f) for f in filter.filters)
    scope = filter.scope
    if isinstance(scope, ResponseFilterScope):
        return _passes_response(doc, filter)
    return _value_matches(_scope_value(doc, scope), filter)


def _scope_value(doc: dict, scope) -> Any:
    if isinstance(scope, MetadataFilterScope):
        name = scope.metadata_property
        name = name.name if hasattr(name, "name") else name
        return doc.get("metadata", {}).get(name)
    if isinstance(scope, SuggestionFilterScope):
        return (doc.get("suggestions", {}).get(scope.question) or {}).get(scope.property or "value")
    if isinstance(scope, RecordFilterScope):
        return doc.get(scope.property)
    raise ValueError(f"Cannot process request for search scope {scope}")


def _value_matches(value: Any, filter: Filter) -> bool:
    values = value if isinstance(value, list) else [value]
    values = [v for v in values if v is not None]
    if isinstance(filter, TermsFilter):
        wanted = {_term(v) for v in filter.values}
        return any(_term(v) in wanted for v in values)
    if isinstance(filter, RangeFilter):
        return any(_in_range(v, filter.ge, filter.le) for v in values)
    raise ValueError(f"Cannot process request for filter {filter}")


def _term(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _in_range(value: Any, ge: Any, le: Any) -> bool:
    if isinstance(value, str) and not isinstance(ge if ge is not None else le, str):
        try:
            value = datetime.fromisoformat(value).timestamp() * 1000  # dates compare as epoch millis
        except ValueError:
            return False
    try:
        return (ge is None or value >= ge) and (le is None or value <= le)
    except TypeError:
        return False


def _passes_response(doc: dict, filter: Filter) -> bool:
    scope: ResponseFilterScope = filter.scope
    responses = doc.get("responses", [])
    if scope.user is not None:
        user_responses = [r for r in responses if r["user_id"] == str(scope.user.id)]
    else:
        user_responses = responses
    if scope.question:
        return any(_value_matches(r["values"].get(scope.question), filter) for r in user_responses)
    if scope.property == "status" and isinstance(filter, TermsFilter):
        statuses = {_term(v) for v in filter.values}
        if ResponseStatusFilter.pending.value in statuses and not user_responses:
            return True
        return any(r["status"] in statuses for r in user_responses)
    raise Exception(f"Cannot process filter scope {scope}")


def _order_value(doc: dict, order: Order) -> Any:
    scope = order.scope
    if isinstance(scope, ResponseFilterScope):
        responses = doc.get("responses", [])
        if scope.user is not None:
            responses = [r for r in responses if r["user_id"] == str(scope.user.id)]
        if scope.question:
            values = [r["values"].get(scope.question) for r in responses]
        else:
            values = [r.get(scope.property) for r in responses]
        values = [v for v in values if v is not None]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers and len(numbers) == len(values):
            return sum(numbers) / len(numbers)
        return values[0] if values else None
    value = _scope_value(doc, scope)
    return min(value) if isinstance(value, list) and value else (None if isinstance(value, list) else value)


def _sorted(hits: list[tuple[dict, float]], sort: List[Order]) -> list[tuple[dict, float]]:
    """Stable multi-key sort; documents without a value go last in either direction."""
    for order in reversed(sort):
        keyed = [(h, _order_value(h[0], order)) for h in hits]
        present = [kv for kv in keyed if kv[1] is not None]
        missing = [kv[0] for kv in keyed if kv[1] is None]
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) for _, v in present):
            present = [(h, str(_plain(v))) for h, v in present]
        present.sort(key=lambda kv: kv[1], reverse=_plain(order.order) == "desc")
        hits = [h for h, _ in present] + missing
    return hits


def _cosine(a: List[float], b: List[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def _user_random(user_id: Any, record_id: str) -> float:
    digest = hashlib.sha256(f"{user_id}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# -- rebuilding after a crash -----------------------------------------------------------------
async def rebuild_index() -> int:
    """Re-index every record of every dataset from argilla-server's database; returns the count."""
    from sqlalchemy import select
    from sqlalchemy.orm import selectinload

    from argilla_server.database import AsyncSessionLocal
    from argilla_server.models import Vector

    db = _db()
    db.execute("DELETE FROM docs")
    total = 0
    async with AsyncSessionLocal() as session:
        datasets = (await session.execute(
            select(Dataset).options(selectinload(Dataset.fields), selectinload(Dataset.metadata_properties))
        )).scalars().all()
        for dataset in datasets:
            offset = 0
            while True:
                records = (await session.execute(
                    select(Record)
                    .where(Record.dataset_id == dataset.id)
                    .order_by(Record.inserted_at, Record.id)
                    .offset(offset)
                    .limit(1000)
                    .options(
                        selectinload(Record.responses),
                        selectinload(Record.suggestions).selectinload(Suggestion.question),
                        selectinload(Record.vectors).selectinload(Vector.vector_settings),
                    )
                )).scalars().all()
                if not records:
                    break
                _put([(str(r.id), str(dataset.id), record_document(r, dataset)) for r in records])
                total += len(records)
                offset += len(records)
    return total
