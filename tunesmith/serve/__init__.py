"""Serving: the model store, Modelfiles, Go templates, the llama.cpp engine and the Ollama-compatible API.

    store.py            blobs + manifests under $TUNESMITH_HOME/models
    modelfile.py        Modelfile text <-> Modelfile
    templates.py        Go text/template renderer (`render`) and Ollama's prompt assembly (`build_prompt`)
    engine.py           llama-cpp-python models: scheduling, streaming, embeddings (`open_llama` for other callers)
    generation.py       request -> prompt, options, grammar, think/tool parsing -> events
    api_types.py        every request/response model
    app.py              FastAPI routes (`create_app`, `serve`); openai_compat.py the /v1 routes
    client.py           what the CLI calls: create, deploy, list, show, ps, cp, rm, run
"""
