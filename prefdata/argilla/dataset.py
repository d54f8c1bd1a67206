"""The Argilla dataset prefdata annotates in: its layout, and finding or creating it.

What annotators see: the guidelines, the conversation, responses A and B, one question
(A / B / tie) and an optional rationale. Argilla's UI folds the dataset guidelines into a
collapsed panel and the question description behind an icon, so the guidelines are also
a field of each record (``guidelines``), shown above the conversation. What they do not see: the A/B order, the AI
verdict and the scores. Those live in metadata: properties declared with
``visible_for_annotators=False`` (owners can still filter on them) and extra metadata,
which argilla-server only returns to owners and admins.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from prefdata.argilla.client import ArgillaError, require_sdk, with_retries

log = logging.getLogger(__name__)

QUESTION = "preference"
RATIONALE = "rationale"
FIELDS = ("prompt", "response_a", "response_b")
GUIDELINES_FIELD = "guidelines"
LABELS = {"A": "Response A is better", "B": "Response B is better", "tie": "Tie: neither is better"}
# Metadata with a property can be filtered in Argilla's UI, but argilla-server validates every such
# value on upload (~3 ms each, most of a bulk upsert's time); the rest is sent as extra metadata.
FILTERABLE = ("flip_prob", "strength", "margin", "route_score")
GUIDELINES = (
    "Read the conversation, then the two responses. Pick the response that is more helpful, "
    "honest and harmless; pick Tie only when neither is better. Optionally say why. "
    "A response marked [truncated at max_new_tokens] was cut off by the generation limit: judge what is "
    "there. Discard a record you cannot judge."
)
SUGGESTION_NOTE = (
    "A pre-selected answer, where one appears, is an AI model's opinion, not the right answer: decide "
    "for yourself. The number beside it is the model's confidence that its pick is the better response "
    "(1 - the estimated probability that the AI label is flipped; 0.5 is a coin toss)."
)
LIST_BATCH = 1000  # argilla-server's maximum page size


@dataclass
class DatasetConfig:
    """Which Argilla dataset; the server and key come from the environment, never from here."""

    dataset: str = "prefdata-pairs"
    workspace: str = "prefdata"


def guidelines_text(guidelines: str, show_ai_suggestion: bool) -> str:
    return guidelines + ("\n\n" + SUGGESTION_NOTE if show_ai_suggestion else "")


def dataset_settings(guidelines: str, min_submitted: int, show_ai_suggestion: bool,
                     columns: list[str] | tuple[str, ...] = FILTERABLE):
    """Fields, questions and metadata of a new dataset; filterable scores among ``columns``."""
    rg = require_sdk()
    description = guidelines_text(guidelines, show_ai_suggestion)
    return rg.Settings(
        guidelines=description,
        fields=[
            rg.TextField(GUIDELINES_FIELD, title="Guidelines", use_markdown=True),
            rg.ChatField("prompt", title="Conversation"),
            rg.TextField("response_a", title="Response A", use_markdown=True),
            rg.TextField("response_b", title="Response B", use_markdown=True),
        ],
        questions=[
            rg.LabelQuestion(QUESTION, labels=LABELS, title="Which response is better?", description=description),
            rg.TextQuestion(RATIONALE, title="Why? (optional)", required=False),
        ],
        metadata=[rg.FloatMetadataProperty(name, visible_for_annotators=False) for name in FILTERABLE
                  if name in columns],
        distribution=rg.TaskDistribution(min_submitted=min_submitted),
        allow_extra_metadata=True,  # a_is, the AI verdict and the raw scores: hidden from annotators
    )


def find_dataset(client, cfg: DatasetConfig):
    """The dataset, or None. A draft left by an interrupted create is deleted (it has no records)."""
    with warnings.catch_warnings():  # the SDK warns when a dataset is not found
        warnings.simplefilter("ignore", UserWarning)
        dataset = client.datasets(name=cfg.dataset, workspace=cfg.workspace)
    if dataset is None:
        return None
    if dataset.serialize().get("status", "ready") != "ready":  # public view of the draft/ready state
        log.warning("dataset %s/%s was left as a draft by an interrupted push; recreating it",
                    cfg.workspace, cfg.dataset)
        dataset.delete()
        return None
    questions = {q.name for q in dataset.settings.questions}
    fields = {f.name for f in dataset.settings.fields}
    if QUESTION not in questions or not set(FIELDS) <= fields:
        raise ArgillaError(f"dataset '{cfg.workspace}/{cfg.dataset}' at {client.api_url} exists with another layout "
                           f"(fields {sorted(fields)}, questions {sorted(questions)}); choose another dataset name")
    return dataset


def lookup(client, cfg: DatasetConfig, retries: int):
    return with_retries(lambda: find_dataset(client, cfg), retries, "looking up the dataset", client.api_url)


def get_or_create_dataset(client, cfg: DatasetConfig, settings, retries: int = 8):
    rg = require_sdk()
    dataset = lookup(client, cfg, retries)
    if dataset is not None:
        return dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        workspace = client.workspaces(cfg.workspace)
    if workspace is None:
        raise ArgillaError(f"workspace '{cfg.workspace}' does not exist at {client.api_url}; create it in Argilla "
                           "or set the workspace option")
    return rg.Dataset(name=cfg.dataset, workspace=workspace, settings=settings, client=client).create()


def iter_records(dataset, url: str, retries: int, with_responses: bool):
    """Every record of ``dataset`` through the SDK's iterator, a page of LIST_BATCH at a time.

    A page that fails transiently is fetched again from its offset (reads are idempotent).
    """
    offset = 0
    while True:
        def page(offset=offset):
            return list(dataset.records(start_offset=offset, batch_size=LIST_BATCH, limit=LIST_BATCH,
                                        with_responses=with_responses, with_suggestions=False))

        records = with_retries(page, retries, "listing records", url)
        yield from records
        if len(records) < LIST_BATCH:
            return
        offset += len(records)


def existing_ids(client, dataset, retries: int = 8) -> set[str]:
    """Record ids (pair ids) of every record in the dataset."""
    return {str(record.id) for record in iter_records(dataset, client.api_url, retries, with_responses=False)}
