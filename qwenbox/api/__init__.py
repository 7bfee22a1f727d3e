"""The OpenAI-compatible HTTP API (aiohttp). ``app.make_app`` builds it."""
