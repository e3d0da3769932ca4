"""Answering prompts outside the server, one place for evaluation, export, training's accuracy probe and
`tunesmith generate`: greedy answers to held-out cases from Hugging Face models and from GGUFs.

    cases.py    `Case` (a conversation and its expected answer), `load_cases`, `held_out_cases`
    hf.py       Hugging Face models: load base or fine-tuned, prompt ids as trained, batched greedy answers,
                streaming, stop ids (`known_templates.FAMILIES`), answer log-likelihoods
    gguf.py     GGUF answers through llama.cpp's batched decoder, the server's (tunesmith/llama/batching.py)
    answer.py   a run's model by the name evaluation gives it (base, finetuned, a GGUF file) -> its answers
"""
