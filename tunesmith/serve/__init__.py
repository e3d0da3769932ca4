"""Serving: the model store, Modelfiles, Go templates, the llama.cpp engine and the Ollama-compatible API.

    store.py            blobs + manifests under $TUNESMITH_HOME/models
    modelfile.py        Modelfile text <-> Modelfile
    gotemplate.py       Go's text/template language (`parse`, `render`)
    prompt.py           Ollama's prompt assembly: messages -> prompt (`build_prompt`)
    engine.py           loaded models: scheduling requests onto their batchers (tunesmith/llama), streaming, embeddings
    generation.py       a job -> events (think/tool parsing), and a started `Generation`
    api_types.py        every request/response model, Ollama's and OpenAI's, error bodies included
    server.py           `Server`: the state every handler shares
    handlers.py         Ollama's handlers, one named function per route
    openai_compat.py    the /v1 handlers, translated onto Ollama's
    app.py              the route table and `create_app` (the API alone; tunesmith/app.py adds the web UI)
    http.py, guard.py   JSON bodies, streams and error replies; Host/Origin/API-key checks
    address.py          where the server is and its API key, from flags, config and environment
    client.py           what the CLI calls: create, deploy, list, show, ps, cp, rm, run
"""
