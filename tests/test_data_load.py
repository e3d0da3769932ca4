"""Readers, record shapes and validation errors: real files in tmp dirs, every error names where and what."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from tunesmith.config import DataConfig
from tunesmith.data import LoadReport, load_examples, validate_file
from tunesmith.errors import DataError

PAIR = {"input": "2+2?", "output": "4"}
EXPECTED = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def write_jsonl(path: Path, records: list, raw_lines: dict[int, bytes] | None = None) -> Path:
    """Records as JSON Lines; raw_lines replaces line N (1-based) with the given bytes."""
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    for number, raw in (raw_lines or {}).items():
        lines[number - 1] = raw
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def error(path: Path, cfg: DataConfig | None = None) -> str:
    with pytest.raises(DataError) as caught:
        load_examples(path, cfg or DataConfig())
    return caught.value.message


# --- readers ---------------------------------------------------------------------------------------------

def test_jsonl_reader_keeps_line_numbers_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIR) + "\n\n" + json.dumps({"input": "a", "output": "b"}) + "\n\n", encoding="utf-8")
    examples = load_examples(path, DataConfig())
    assert examples[0].messages == EXPECTED
    assert [(e.source.line, e.source.index) for e in examples] == [(1, 0), (3, 1)]


def test_json_array_reader_gives_each_record_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"input": "2+2?", "output": "4"},\n\n  {"input": "a",\n   "output": "b"}\n]\n', encoding="utf-8")
    examples = load_examples(path, DataConfig())
    assert examples[0].messages == EXPECTED
    assert [(e.source.line, e.source.index) for e in examples] == [(2, 0), (4, 1)]


def test_json_file_holding_json_lines_is_read_as_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [PAIR, PAIR | {"output": "four"}])
    report = LoadReport(str(path))
    assert len(load_examples(path, DataConfig(), report)) == 2
    assert report.reader == "jsonl"


def test_csv_and_tsv_readers(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["Add", "2 and 2", "4"])
        writer.writerow(["Say hi", "", "hi\nthere"])  # a quoted newline: the next record starts on line 5
        writer.writerow(["Say bye", "", "bye"])
    examples = load_examples(path, DataConfig())
    assert examples[0].messages[0]["content"] == "Add\n\n2 and 2"
    assert examples[1].messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi\nthere"}]
    assert [e.source.line for e in examples] == [2, 3, 5]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("prompt\tcompletion\nhello\tworld\n", encoding="utf-8")
    assert load_examples(tsv, DataConfig())[0].messages[1]["content"] == "world"


def test_parquet_reader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"input": ["2+2?", "x"], "output": ["4", None]}), path)
    assert load_examples(path, DataConfig(on_error="skip"))[0].messages == EXPECTED
    message = error(path)
    assert f"{path}, record 1, field 'output'" in message and "null" in message


def test_datasets_folder_reader(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]}
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    assert load_examples(tmp_path / "one", DataConfig())[0].messages[1]["content"] == "hello"
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_examples(tmp_path / "dd", DataConfig())) == 1
    DatasetDict({"a": Dataset.from_dict(rows), "b": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "ab"))
    assert "splits a, b and no 'train'" in error(tmp_path / "ab")


def test_missing_file_unknown_type_and_plain_folder(tmp_path):
    assert "file not found" in error(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hi", encoding="utf-8")
    assert "unknown file type '.txt'" in error(tmp_path / "d.txt")
    (tmp_path / "folder").mkdir()
    assert "not one saved by `datasets`" in error(tmp_path / "folder")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    assert "no records" in error(tmp_path / "empty.jsonl")


# --- reader errors: file, line, column/offset ------------------------------------------------------------

def test_invalid_json_line_names_line_and_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR, PAIR, PAIR], {2: b'{"input": "a", "output": }'})
    message = error(path)
    assert message.startswith(f"{path}, line 2 (record 1): not valid JSON at column 26: Expecting value")


def test_non_utf8_bytes_name_line_and_offset(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR, PAIR], {2: b'{"input": "caf\xe9", "output": "x"}'})
    first_line = len(json.dumps(PAIR).encode()) + 1
    message = error(path)
    assert f"{path}, line 2 (record 1)" in message
    assert f"not UTF-8: byte 0xe9 at offset {first_line + 14} (column 15)" in message
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"input,output\nok,fine\ncaf\xe9,x\n")
    assert f"{csv_path}, line 3: not UTF-8: byte 0xe9" in error(csv_path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR, ["input", "output"]])
    assert f"{path}, line 2 (record 1): expected a JSON object per line, got an array" in error(path)


def test_broken_json_array_names_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"input": "a", "output": "b"}\n {"input": "c", "output": "d"}\n]', encoding="utf-8")
    assert f"{path}, line 3, column 2: not valid JSON: expected ',' or ']'" in error(path)
    path.write_text('{\n "data": [1]\n}', encoding="utf-8")
    assert "holds one JSON object" in error(path)
    path.write_text('[{"input": "a", "output": "b"}, 7]', encoding="utf-8")
    assert f"{path}, line 1 (record 1): expected a JSON object, got a number" in error(path)


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("input,output\na,b\nc,d,e\nf\n", encoding="utf-8")
    assert f"{path}, line 3 (record 1): row has 3 fields but the header names 2" in error(path)
    report = LoadReport(str(path))
    load_examples(path, DataConfig(on_error="skip"), report)
    assert f"{path}, line 4 (record 2), field 'output': row has fewer fields" in report.skipped[1]


def test_a_csv_field_over_131072_characters_is_read_and_a_later_error_names_its_own_line(tmp_path):
    long = "word " * 40_000  # 200,000 characters: Python's csv refused fields over 131,072
    path = tmp_path / "d.csv"
    path.write_text(f'input,output\na,b\n"{long}",c\nd,"never closed\ne,f\n', encoding="utf-8")
    with pytest.raises(DataError) as caught:
        list(load_examples(path, DataConfig()))
    # The unclosed quote opens the record on line 4; the parser only notices at the end of the file (line 6).
    assert caught.value.message == f"{path}, line 4: cannot parse CSV: unexpected end of data"
    path.write_text(f'input,output\na,b\n"{long}",c\n', encoding="utf-8")
    assert [len(e.messages[0]["content"]) for e in load_examples(path, DataConfig())] == [1, len(long)]


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_json_nested_deeper_than_python_recurses_is_one_error_naming_the_record(tmp_path, suffix):
    deep = '{"input": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "x"}'  # a RecursionError in json
    path = tmp_path / f"d.{suffix}"
    good = json.dumps(PAIR)
    path.write_text(f"{good}\n{deep}\n" if suffix == "jsonl" else f"[{good},\n{deep}]\n", encoding="utf-8")
    assert error(path) == f"{path}, line 2 (record 1): nested too deeply (more than Python's recursion limit of " \
                          "about 1,000 levels of [ and {)"
    # In JSON Lines one line is one record, so with on_error: skip the others are still read; in a JSON array
    # where the deep record ends is unknown, so the whole file stops.
    skipping = DataConfig(on_error="skip")
    loaded = (lambda: len(load_examples(path, skipping))) if suffix == "jsonl" else (lambda: error(path, skipping))
    assert loaded() == (1 if suffix == "jsonl" else error(path))


# --- shapes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("record, shape, messages", [
    ({"input": "q", "output": "a", "system": "s"}, "input_output",
     [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
    ({"instruction": "do", "input": "this", "output": "done"}, "alpaca",
     [{"role": "user", "content": "do\n\nthis"}, {"role": "assistant", "content": "done"}]),
    ({"instruction": "do", "output": "done"}, "alpaca",
     [{"role": "user", "content": "do"}, {"role": "assistant", "content": "done"}]),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
                   {"role": "assistant", "content": "a2"}]}, "chat",
     [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"}, "sharegpt",
     [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
    ({"prompt": "q", "completion": "a"}, "prompt_completion",
     [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
])
def test_each_shape_is_detected_and_normalized(tmp_path, record, shape, messages):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    report = LoadReport(str(path))
    assert load_examples(path, DataConfig(), report)[0].messages == messages
    assert report.shape == shape


def test_fields_mapping_and_errors_use_the_users_names(tmp_path):
    cfg = DataConfig(fields={"input": "question", "output": "answer"})
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a", "id": 7}, {"question": "q2", "answer": " "}])
    assert f"{path}, line 2 (record 1), field 'answer': empty output" in error(path, cfg)
    report = LoadReport(str(path))
    assert load_examples(path, cfg.model_copy(update={"on_error": "skip"}), report)[0].messages[1]["content"] == "a"
    assert report.ignored_fields == {"id": 1}
    chat = write_jsonl(tmp_path / "c.jsonl", [{"dialog": [{"speaker": "user", "text": "q"}, {"speaker": "assistant", "text": "a"}]}])
    inner = DataConfig(format="chat", fields={"messages": "dialog", "role": "speaker", "content": "text"})
    assert load_examples(chat, inner)[0].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_system_prompt_fills_in_only_where_the_record_has_none(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR, PAIR | {"system": "own", "output": "four"}])
    examples = load_examples(path, DataConfig(system_prompt="default"))
    assert examples[0].messages[0] == {"role": "system", "content": "default"}
    assert examples[1].messages[0] == {"role": "system", "content": "own"}


# --- validation errors: file, line/index, field, problem ------------------------------------------------

@pytest.mark.parametrize("record, field, problem", [
    ({"input": "q"}, None, "no known record shape"),
    ({"input": "q", "output": ""}, "output", "empty output"),
    ({"input": "", "output": "a"}, "input", "empty input"),
    ({"input": "q", "output": 4}, "output", "wrong type: expected a string, got a number"),
    ({"input": "q", "output": "a", "system": ["s"]}, "system", "wrong type: expected a string, got a list"),
    ({"messages": "hi"}, "messages", "wrong type: expected a list of turns, got a string"),
    ({"messages": []}, "messages", "empty conversation"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}, "messages[1].role",
     "bad role order: 'user' after user; expected assistant"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "messages[0].role",
     "bad role order: 'assistant' after the start; expected system or user"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q"}]}, "messages[2].role", "ends with 'user'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}, "messages[1].role",
     "bad role order"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "messages[1].role",
     "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "messages[1].content",
     "empty assistant turn"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing field"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}, "conversations[1].from",
     "unknown speaker 'robot'"),
    ({"prompt": "q", "completion": None}, "completion", "is null"),
])
def test_record_errors_name_file_line_field_and_problem(tmp_path, record, field, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    message = error(path)
    where = f"{path}, line 1 (record 0)" + (f", field {field!r}" if field else "")
    assert message.startswith(where), message
    assert problem in message


def test_explicit_format_reports_the_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError) as caught:
        load_examples(path, DataConfig(format="input_output"))
    assert caught.value.message.startswith(f"{path}, line 1 (record 0), field 'input': missing field")
    assert "the record looks like prompt_completion" in caught.value.hint


def test_mixed_shapes_name_the_first_record_of_each(tmp_path):
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR, PAIR | {"output": "x"}, chat, chat])
    message = error(path, DataConfig(on_error="skip"))  # not skippable: which half is wrong is a guess
    assert "mixed record shapes" in message
    assert f"{path}, line 1 (record 0) is input_output" in message
    assert f"{path}, line 3 (record 2) is chat" in message


def test_skip_reports_every_skipped_record_and_the_count(tmp_path, caplog):
    bad = {2: b"{oops", 4: b'{"input": "q", "output": ""}'}
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR, PAIR, PAIR | {"output": "3"}, PAIR, PAIR | {"output": "5"}], bad)
    report = LoadReport(str(path))
    with caplog.at_level(logging.WARNING, logger="tunesmith.data"):
        examples = load_examples(path, DataConfig(on_error="skip"), report)
    assert [e.source.line for e in examples] == [1, 3, 5]
    assert report.records == 5 and report.loaded == 3 and len(report.skipped) == 2
    assert report.skipped[0].startswith(f"{path}, line 2 (record 1): not valid JSON")
    assert report.skipped[1] == f"{path}, line 4 (record 3), field 'output': empty output"
    assert "skipped 2 of 5 records" in caplog.text
    assert all(line in caplog.text for line in report.skipped)


def test_all_records_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "q", "output": ""}])
    assert "none of its 1 records is valid" in error(path, DataConfig(on_error="skip"))


def test_validate_file_streams_and_returns_the_report(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR] * 3)
    report = validate_file(path, DataConfig())
    assert (report.records, report.loaded, report.shape, report.reader) == (3, 3, "input_output", "jsonl")


def test_byte_order_marks_and_a_jsonl_file_holding_an_array(tmp_path):
    bom = b"\xef\xbb\xbf"
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(bom + json.dumps(PAIR).encode() + b"\n")
    assert load_examples(jsonl, DataConfig())[0].messages == EXPECTED
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(bom + b"input,output\n2+2?,4\n")
    assert load_examples(csv_path, DataConfig())[0].messages == EXPECTED
    array = tmp_path / "a.jsonl"
    array.write_text(json.dumps([PAIR]), encoding="utf-8")
    report = LoadReport(str(array))
    assert load_examples(array, DataConfig(), report)[0].messages == EXPECTED and report.reader == "json"
