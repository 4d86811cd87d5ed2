"""offload-serve: an OpenAI-compatible HTTP server whose concurrent requests decode in one batch.

`server.Server` holds the model and its engine thread (`batcher.Batcher`); `app.create_app` puts the
FastAPI routes in front; `cli` is the command. Nothing is imported here, so the package loads without
the `serve` extra and the command can say what to install.
"""
