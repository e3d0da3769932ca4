"""The model store, the Modelfile parser and the GGUF header reader, on real files."""

from __future__ import annotations

import hashlib

import pytest

from tunesmith.serve import gguf_meta, modelfile
from tunesmith.serve.store import (
    BlobNotFound,
    DigestMismatch,
    InvalidDigest,
    InvalidName,
    Manifest,
    ModelNotFound,
    Store,
    file_digest,
    full_name,
    parse_name,
)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_blob_is_kept_only_when_its_digest_matches(tmp_path):
    store = Store(tmp_path)
    data = b"hello blob"
    with pytest.raises(DigestMismatch):
        store.write_blob(_digest(b"other"), [data])
    assert not any((tmp_path / "blobs").iterdir())  # no partial or temporary file left behind
    assert store.write_blob(_digest(data), [data[:4], data[4:]]) is True
    assert store.write_blob(_digest(data).replace(":", "-"), [data]) is False
    assert store.blob_path(_digest(data)).read_bytes() == data
    with pytest.raises(InvalidDigest):
        store.write_blob("sha256:../../etc/passwd", [data])


@pytest.mark.parametrize("name", ["../x", "a/../../b", "/abs", "a:b:c", "x y", "", ".hidden", "a/b/c/d", "a:"])
def test_bad_names_are_rejected(name):
    with pytest.raises(InvalidName):
        parse_name(name)


def test_names_default_to_latest():
    assert full_name("godrive") == "godrive:latest"
    assert parse_name("me/godrive:q8_0") == ("me/godrive", "q8_0")


def test_manifests_copy_delete_and_blob_refcount(tmp_path, smollm2_gguf):
    store = Store(tmp_path)
    digest = store.add_file(smollm2_gguf)
    assert digest == file_digest(smollm2_gguf)
    adapter = b"not really an adapter"
    store.write_blob(_digest(adapter), [adapter])
    store.write("godrive", Manifest(model=digest, adapters=[_digest(adapter)], template="{{ .Prompt }}",
                                    parameters={"stop": ["<|im_end|>"]}))
    assert store.read("godrive:latest").size == smollm2_gguf.stat().st_size + len(adapter)
    store.copy("godrive", "me/copy:v1")
    assert [name for name, _ in store.list()] == ["me/copy:v1", "godrive:latest"]

    store.delete("godrive")
    assert store.has_blob(digest)  # still used by me/copy:v1
    with pytest.raises(ModelNotFound):
        store.read("godrive")
    store.delete("me/copy:v1")
    assert not store.has_blob(digest) and not store.has_blob(_digest(adapter))
    assert store.list() == []
    assert not (tmp_path / "manifests" / "me").exists()


def test_manifest_needs_its_blobs(tmp_path):
    with pytest.raises(BlobNotFound):
        Store(tmp_path).write("x", Manifest(model=_digest(b"missing")))


def test_gguf_details_of_the_builtin_model(smollm2_gguf):
    meta, params = gguf_meta.read_metadata(smollm2_gguf)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.embedding_length"] == 576
    assert meta["tokenizer.ggml.tokens"] is None  # long arrays are skipped
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    details = gguf_meta.details(smollm2_gguf)
    assert details["quantization_level"] == "Q4_1"
    assert details["parameter_size"] == gguf_meta.parameter_size(params)
    assert 130e6 < params < 140e6


def test_gguf_reader_rejects_other_files(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(gguf_meta.GGUFError):
        gguf_meta.read_metadata(path)


MODELFILE = '''# a comment
FROM ./model.gguf
template """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}<|im_start|>user
{{ .Prompt }}<|im_end|>
<|im_start|>assistant
"""
SYSTEM You give driving instructions.   
PARAMETER temperature 0.2
PARAMETER num_ctx 4096
PARAMETER stop <|im_end|>
PARAMETER stop "<|im_start|>"
PARAMETER penalize_newline true
ADAPTER ./adapter.gguf
MESSAGE user "Turn left?"
MESSAGE assistant Yes, at the light.
LICENSE """Apache 2.0
text"""
'''


def test_modelfile_parses_like_ollama():
    mf = modelfile.parse(MODELFILE)
    assert mf.from_ == "./model.gguf"
    assert mf.template.startswith("{{ if .System }}<|im_start|>system\n") and mf.template.endswith("assistant\n")
    assert mf.system == "You give driving instructions."
    assert mf.parameters == {"temperature": 0.2, "num_ctx": 4096, "stop": ["<|im_end|>", "<|im_start|>"]}
    assert mf.adapters == ["./adapter.gguf"]
    assert mf.messages == [{"role": "user", "content": "Turn left?"},
                           {"role": "assistant", "content": "Yes, at the light."}]
    assert mf.license == ["Apache 2.0\ntext"]
    assert mf.warnings == ["parameter 'penalize_newline' is deprecated and ignored"]


def test_modelfile_round_trips_through_text():
    mf = modelfile.parse(MODELFILE)
    mf.system = ' leading space and "quotes" '
    mf.messages.append({"role": "user", "content": 'ends with a quote"'})
    mf.messages.append({"role": "user", "content": 'has """ triple \\ backslash'})
    again = modelfile.parse(mf.to_text())
    for attr in ("from_", "template", "system", "parameters", "adapters", "messages", "license"):
        assert getattr(again, attr) == getattr(mf, attr), attr


@pytest.mark.parametrize(("text", "message"), [
    ("PARAMETER temperature 0.2\n", "no FROM line"),
    ("FROM x\nBOGUS y\n", "command must be one of"),
    ("FROM x\nPARAMETER nope 1\n", "unknown parameter 'nope'"),
    ("FROM x\nPARAMETER num_ctx lots\n", "invalid int value"),
    ("FROM x\nMESSAGE tool hi\n", "message role must be one of"),
    ('FROM x\nSYSTEM """never closed\n', "unexpected EOF"),
    ("FROM x\nSYSTEM\n", "unexpected EOF"),
])
def test_modelfile_errors(text, message):
    with pytest.raises(modelfile.ModelfileError, match=message):
        modelfile.parse(text)
