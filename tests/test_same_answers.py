"""The model that is scored is the model that is served: on a tiny fine-tuned run, the Modelfile's GGUF gives the
same greedy answers to the held-out prompts through export (fidelity.json), through `tunesmith eval` (its own
decoding, and the answers it takes from export) and through the server (`ollama` client, the Modelfile created
in the store), each prompt rendered by its own path (training's chat template, the Modelfile's Go template)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import ollama
from rich.console import Console

from tests.serve_fixtures import start_server
from tests.test_export_support import QUESTIONS, make_run
from tunesmith.serve.store import Store

MAX_NEW = 12


def test_served_evaluated_and_exported_answers_are_the_same(builtin_checkpoint, tmp_path):
    from tunesmith.evaluate.compare import evaluate
    from tunesmith.export import export_run
    from tunesmith.inference.answer import answers
    from tunesmith.inference.cases import load_cases
    from tunesmith.run import Run
    from tunesmith.serve import client
    from tunesmith.testing import tiny_checkpoint

    base = tiny_checkpoint(tmp_path / "varied", "qwen3", init_std=0.16)  # answers that differ between prompts
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in QUESTIONS), encoding="utf-8")
    run = Run(make_run(tmp_path, base, "same", system_prompt="Answer briefly.", lora_b=0.05,
                   eval={"file": str(test), "max_new_tokens": MAX_NEW},
                   export={"quantizations": ["q8_0"], "fidelity_prompts": 4, "min_agreement": 0.0}))
    console = Console(file=io.StringIO(), width=200)
    result = export_run(run, None, console)
    gguf = result.ggufs["q8_0"]
    exported = json.loads(run.fidelity.read_text())["quantizations"][0]["answers"]

    config = run.recorded_config()
    cases = load_cases(test, config, None)
    evaluated = answers(str(gguf), config, run, [case.messages for case in cases])
    (scored,) = evaluate(config, run, None, [str(gguf)], console)
    assert "the answers export gave" in console.file.getvalue()

    store = Store(tmp_path / "models")
    server = start_server(store)
    try:
        client.create_from_modelfile(server.url, "same", run.modelfile)
        oc = ollama.Client(host=server.url)
        # The Modelfile sets temperature 0; repeat_penalty 1 turns off Ollama's default penalty (1.1), which
        # evaluation's greedy decoding does not apply.
        served = [oc.chat(model="same", messages=case.messages,
                          options={"num_predict": MAX_NEW, "repeat_penalty": 1.0}).message.content.strip()
                  for case in cases]
    finally:
        server.stop()
    assert len(set(evaluated)) > len(cases) // 2, evaluated  # the answers differ: a mix-up would show
    assert exported == evaluated == scored.answers == served
    assert Path(result.modelfile).read_text().startswith("FROM ./gguf/same.q8_0.gguf\n")
