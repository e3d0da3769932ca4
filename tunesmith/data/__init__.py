"""Training data: read files, check records, render with the model's chat template, split, report.

The plain interfaces (each module's docstring says more):
  load_examples(path, data_cfg, report=None) -> list[Example]     validate.py: read + check + normalize
  iter_examples / validate_file                                   the same, streaming / keeping nothing
  tokenize(tokenizer, example, data_cfg, train_cfg) -> {"input_ids", "labels"}   render.py
  prepare(config, tokenizer) -> Prepared(.train, .eval, .stats)   prepare.py: the whole data stage
  summary_lines(prepared.stats) -> list[str]                      stats.py: what to print after prepare
  inspect_file(path, config, console)                             inspect.py: `tunesmith data inspect`
An `Example` has `messages` ([{"role", "content"}], system turn first when there is one) and `source`
(file, line, record index) for error messages. Bad data raises `tunesmith.errors.DataError`.
"""

from tunesmith.data.prepare import Prepared, prepare
from tunesmith.data.render import IGNORE_INDEX, Rendered, fit_length, render, tokenize, tokenize_many
from tunesmith.data.source import Source
from tunesmith.data.stats import summary_lines
from tunesmith.data.validate import Example, LoadReport, iter_examples, load_examples, validate_file

__all__ = [
    "IGNORE_INDEX", "Example", "LoadReport", "Prepared", "Rendered", "Source", "fit_length", "iter_examples",
    "load_examples", "prepare", "render", "summary_lines", "tokenize", "tokenize_many", "validate_file",
]
