"""An OpenAI-compatible HTTP server for a loaded model: ``loramoe serve``.

Modules, from the model outward:

- (``inference.loop``, below this package: batched decoding with per-request sampling, stopping and streaming.)
- ``batcher``: the queue in front of the model; gathers requests into batches run on one worker thread.
- ``protocol``: the OpenAI request models, their validation, and the response and error bodies.
- ``reading``: reading a request's body, bounded in size and JSON depth, as valid Unicode.
- ``app``: the ASGI application (routes, limits, API key, server-sent events).
- ``server``: ``serve``, which runs the app with uvicorn, with a header timeout and a connection limit.
"""
