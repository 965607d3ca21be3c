"""Serving the finished model: a Ray Serve application with OpenAI's chat-completions API.

``protocol.py`` (request validation, responses, SSE chunks, error bodies), ``batching.py`` (concurrent requests
batched into one generation call, token streaming), ``app.py`` (the FastAPI ingress deployment, ``build_app``,
``app_builder`` for Serve config YAMLs, ``run_server`` for ``zephyr-ray serve``).
"""
