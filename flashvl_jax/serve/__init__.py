"""`python -m flashvl_jax.serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

protocol (request models, images, messages) -> service (engine requests, text, stop strings, metrics) -> app
(FastAPI routes, errors, Server-Sent Events) -> __main__ (the CLI). Needs the `serve` extra:
`pip install 'flashvl-jax[serve]'` (FastAPI, uvicorn, prometheus-client).
"""
