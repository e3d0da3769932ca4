"""Serving: the model store, Modelfiles, Go templates, the llama.cpp engine and the Ollama-compatible API.

    store.py            blobs + manifests under $TUNESMITH_HOME/models
    modelfile.py        Modelfile text <-> Modelfile
    gguf_meta.py        a GGUF's header (metadata, parameter count) without its tensors: `show`, `tags`, details
    known_templates.py  chat-template families: their markers, stop tokens and Ollama templates
    gotemplate.py       Go's text/template language (`parse`, `render`)
    prompt.py           Ollama's prompt assembly: messages, tools, think -> prompt (`build_prompt`)
    options.py          Ollama's `options` and PARAMETERs -> llama.cpp sampling settings; `keep_alive`
    engine.py           loaded models: scheduling requests onto their batchers (tunesmith/llama), streaming, embeddings
    token_count.py      counting a long prompt's tokens piece by piece, to refuse it early
    generation.py       a job -> events, and a started `Generation`
    thinking.py         `<think>` reasoning split from the answer as tokens stream
    tools.py            tool calls found in the output
    api_types.py        every request/response model, Ollama's and OpenAI's, error bodies included
    server.py           `Server`: the state every handler shares
    handlers.py         Ollama's handlers, one named function per route
    openai_compat.py    the /v1 handlers, translated onto Ollama's
    routes.py           the route table and `create_api` (the API alone; tunesmith/app.py adds the web UI)
    http.py             errors and their bodies, JSON bodies read as Go reads them, NDJSON and SSE streams
    strict_json.py      JSON as Go's encoding/json accepts it: no NaN, no overflowing number, bounded depth
    guard.py            Host/Origin/API-key checks and body size, before any route
    timeouts.py         how long a client may take to send its request (uvicorn's missing read timeout)
    address.py          where the server is and its API key, from flags, config and environment
    client.py           the API client (the official `ollama` one): create, deploy, list, show, ps, cp, rm, chat

Above this package: tunesmith/app.py (the server with the web UI, `python -m tunesmith.app`),
tunesmith/local_server.py (starting it in the background), tunesmith/tables.py and tunesmith/interactive.py
(what `tunesmith list/ps/show` print, the chat of `tunesmith run`).
"""
