"""``llm serve``: a checkpoint behind OpenAI's HTTP API, with continuous batching and a chat
page. :mod:`~llm.serving.engine` batches, :mod:`~llm.serving.schemas` reads requests,
:mod:`~llm.serving.app` answers them (FastAPI; the ``serve`` extra)."""
