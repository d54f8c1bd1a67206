"""Human-in-the-loop with Argilla: push hard pairs, pull human labels, merge them back.

Modules by concern:

* ``client``: credentials, the server version check, retries (tenacity), quiet SDK logs;
* ``dataset``: the dataset layout annotators see (and what they do not), find or create it;
* ``push``: pairs to records, blind by default, idempotent (record id = pair id);
* ``pull``: records and responses back, user ids turned into user names;
* ``merge``: resolving several annotators and merging verdicts with provenance (pure);
* ``users``: annotator accounts with generated passwords;
* ``cli``: ``prefdata argilla ...``.

Credentials come from ``ARGILLA_API_URL`` / ``ARGILLA_API_KEY``; without them, from a dev
server started by ``prefdata argilla serve``. The key is never logged or written out.
"""

from prefdata.argilla.cli import cli_main
from prefdata.argilla.client import (SUPPORTED_TEXT, ArgillaError, DatasetMissing, check_server_version, connect,
                                     credentials, quiet_sdk_logs, require_sdk, with_retries)
from prefdata.argilla.dataset import (FILTERABLE, GUIDELINES, LABELS, QUESTION, RATIONALE, DatasetConfig,
                                      dataset_settings, existing_ids, find_dataset, get_or_create_dataset)
from prefdata.argilla.merge import ANNOTATIONS, PROVENANCE, MergeConfig, annotations_fingerprint, merge, resolve
from prefdata.argilla.pull import PullConfig, fetch_annotations, pull, user_names
from prefdata.argilla.push import (MAX_BATCH, TRUNCATED_NOTE, PushConfig, PushResult, a_is_chosen, build_records,
                                   pairs_to_push, push)
from prefdata.argilla.users import add_user, list_users, remove_user

__all__ = [
    "ANNOTATIONS", "FILTERABLE", "GUIDELINES", "LABELS", "MAX_BATCH", "PROVENANCE", "QUESTION", "RATIONALE",
    "SUPPORTED_TEXT", "TRUNCATED_NOTE", "ArgillaError", "DatasetConfig", "DatasetMissing", "MergeConfig",
    "PullConfig", "PushConfig", "PushResult", "a_is_chosen", "add_user", "annotations_fingerprint",
    "build_records", "check_server_version", "cli_main", "connect", "credentials", "dataset_settings",
    "existing_ids", "fetch_annotations", "find_dataset", "get_or_create_dataset", "list_users", "merge",
    "pairs_to_push", "pull", "push", "quiet_sdk_logs", "remove_user", "require_sdk", "resolve", "user_names",
    "with_retries",
]
