"""Serving: the OpenAI request schema (`schema`), a dynamic batcher over the `Engine` (`batcher`), the model
behind the HTTP layer (`service`), the FastAPI app (`app`), uvicorn with a drain on SIGTERM (`server`), the chat
page (`page`) and the terminal conversation (`conversation`). Only `app` and `server` import FastAPI/uvicorn."""
