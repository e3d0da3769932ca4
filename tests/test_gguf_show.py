"""Every GGUF type tunesmith's export writes is described as it is: the header reader against gguf-py's own
reader, and `tunesmith show` for a tiny model converted and quantized to each type of config.QUANTIZATIONS."""

from __future__ import annotations

import pytest
from gguf import GGUFReader, GGUFWriter, LlamaFileType

from tests.conftest import run_cli
from tests.serve_fixtures import start_server
from tunesmith.config import QUANTIZATIONS
from tunesmith.serve import client, gguf_meta
from tunesmith.serve.store import Store
from tunesmith.tables import show_text

CONVERTER_TYPES = ["f32", "f16", "bf16", "q8_0"]  # what convert_hf_to_gguf.py writes itself (--outtype)


def _reader_view(path) -> dict:
    """The header as gguf-py's GGUFReader reads it: every field short enough to keep, and the tensors."""
    reader = GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        fields[name] = None if isinstance(value, list) and len(value) > gguf_meta.MAX_ARRAY else value
    return {"fields": fields, "params": sum(int(t.n_elements) for t in reader.tensors)}


def test_header_reader_agrees_with_gguf_py(smollm2_gguf):
    meta, params = gguf_meta.read_metadata(smollm2_gguf)
    expected = _reader_view(smollm2_gguf)
    assert params == expected["params"]
    assert meta.keys() == expected["fields"].keys()
    for key, value in expected["fields"].items():
        assert meta[key] == pytest.approx(value) if isinstance(value, float) else meta[key] == value, key


@pytest.mark.parametrize(("file_type", "shown"), [
    (LlamaFileType.MOSTLY_Q4_K_M, "Q4_K_M"), (LlamaFileType.ALL_F32, "F32"), (LlamaFileType.MOSTLY_BF16, "BF16"),
    (38, "MXFP4_MOE"), (39, "NVFP4"), (40, "Q1_0"),  # types a hand-written table had missed
    (9999, "unknown"),  # newer than this gguf-py: said so, not guessed
])
def test_quantization_level_names_llama_cpp_file_types(tmp_path, file_type, shown):
    import numpy as np

    path = tmp_path / "t.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_file_type(int(file_type))
    writer.add_tensor("w", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_meta.details(path)["quantization_level"] == shown


def test_without_a_file_type_the_type_of_most_parameters_names_it(tmp_path):
    import numpy as np

    path = tmp_path / "t.gguf"
    writer = GGUFWriter(path, "llama")  # no general.file_type: gguf-py writes none unless told
    writer.add_tensor("small", np.zeros((4, 32), dtype=np.float32))
    writer.add_tensor("large", np.zeros((16, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_meta.details(path)["quantization_level"] == "F16"


@pytest.fixture(scope="module")
def every_type(tiny_qwen3, tmp_path_factory) -> dict[str, object]:
    """The tiny model as GGUF: the converter's own types, then each quantization made from its f32."""
    from tunesmith.export.convert import convert_checkpoint
    from tunesmith.export.quantize import quantize

    folder = tmp_path_factory.mktemp("types")
    files = {f"convert-{t}": convert_checkpoint(tiny_qwen3, folder / f"convert-{t}.gguf", t) for t in CONVERTER_TYPES}
    for name in QUANTIZATIONS:
        files[name] = quantize(files["convert-f32"], folder / f"{name}.gguf", name, threads=1)
    return files


@pytest.mark.slow
def test_show_describes_each_type_the_export_writes(every_type, tmp_path):
    # Every type holds the same tensors: gguf-py's reader (seconds for a 49k-token vocabulary) reads one.
    reference = _reader_view(every_type["convert-f32"])
    arch = reference["fields"]["general.architecture"]
    server = start_server(Store(tmp_path / "store"))
    try:
        for name, path in every_type.items():
            (tmp_path / "Modelfile").write_text(f"FROM {path}\n")
            client.create_from_modelfile(server.url, name, tmp_path / "Modelfile")
            shown = show_text(server.url, name)  # what `tunesmith show NAME` prints
            expected = [f"architecture        {arch}",
                        f"parameters          {gguf_meta.parameter_size(reference['params'])}",
                        f"context length      {reference['fields'][f'{arch}.context_length']}",
                        f"embedding length    {reference['fields'][f'{arch}.embedding_length']}",
                        f"quantization        {name.removeprefix('convert-').upper()}"]
            for line in expected:
                assert line in shown, (name, line, shown)
        # And once through the real command, as a user runs it.
        done = run_cli("show", "q4_k_m", env={"TUNESMITH_HOST": server.url})
        assert done.returncode == 0 and "quantization        Q4_K_M" in done.stdout, done.stderr
    finally:
        server.stop()
