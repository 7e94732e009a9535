"""The HTTP search service and its web page, built on
:class:`retrieval.search.retriever.Retriever` only.

retrieval serve BUNDLE [--host 127.0.0.1] [--port 8000] [--token SECRET]
"""

from retrieval.service.app import create_app
from retrieval.service.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]
