"""llama.cpp, below everything that runs a GGUF (the server, evaluation, export and its fidelity check).

    load.py         open a GGUF: threads, model and context parameters, `open_llama`, `open_vocab`
    batching.py     `Batcher`: many sequences decoded together in one context (continuous batching)
    logliks.py      log-likelihood of given answers under a GGUF (export's fidelity check)
"""
