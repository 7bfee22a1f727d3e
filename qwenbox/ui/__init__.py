"""The chat page: a Chainlit app behind Nginx, one more client of the qwenbox API.

It runs in its own process and its own Python environment (Chainlit's dependencies are
not vLLM's), started by ``qwenbox ui`` (``launch``), and talks to the daemon only through
the public API on the unix socket (``client``). Modules:

- ``launch``: what ``qwenbox ui`` runs in the daemon's environment: reads the config,
  writes Chainlit's config into ``ui.state_dir``, execs Chainlit in the UI environment.
- ``settings``: the few values the app needs, handed over in one environment variable.
- ``textcheck``: refuses empty, oversized or binary text before anything is sent.
- ``client``: the API client (AsyncOpenAI over the unix socket), retries while the model
  starts, friendly messages for every failure; no Chainlit import, so it is unit-tested.
- ``batcher``: coalesces stream deltas into page updates every few tens of milliseconds.
- ``app``: the Chainlit handlers (the only module that imports chainlit).
"""
