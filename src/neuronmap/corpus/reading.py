"""Documents of a corpus: a file, or a folder of files whose names are the labels.

`.txt`: documents are separated by blank lines. `.jsonl`: one JSON object per line, its text
in `text_column` (and its label, if any, in `label_column`). `.parquet`: the same columns.
A document's shard is a stable hash of its label and text, so adding documents never moves
existing ones to another shard.

Nothing passes in silence: a label file with no document (its label would drop out of the
comparison) and a `label_column` that cannot apply (a folder, whose labels are its file names;
a .txt file, which has no columns; a file without that column) are errors naming the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import NeuronmapError

FORMATS = (".txt", ".jsonl", ".parquet")
NO_LABEL = ""


@dataclass(frozen=True)
class Document:
    document: str   # "<file>:<index>", its place in the corpus
    label: str
    text: str

    def shard(self, shards: int) -> int:
        digest = hashlib.blake2b(f"{self.label}\0{self.text}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % shards

    def heldout(self, fraction: float) -> bool:
        """Held out of the records for the labels stage's perplexity check: a stable draw of
        `fraction` of the documents, independent of the shard."""
        digest = hashlib.blake2b(f"heldout\0{self.label}\0{self.text}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") < fraction * 2 ** 64


def corpus_files(path: str | Path, label_column: str | None = None) -> list[tuple[Path, str | None]]:
    """The corpus's files with their label (a folder's file stems) or None (labels from a column).

    Cheap enough for every parse of the workflow: names and sizes, no contents."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        unknown = [p.name for p in files if p.suffix not in FORMATS]
        if unknown:
            raise NeuronmapError(f"{path}: corpus folder holds files neuronmap cannot read: {', '.join(unknown)} "
                                 f"(a corpus folder holds {', '.join(FORMATS)} files named by their label)")
        if not files:
            raise NeuronmapError(f"{path}: corpus folder is empty")
        if label_column is not None:
            raise NeuronmapError(f"corpus.label_column {label_column!r} cannot apply to the corpus folder {path}: its "
                                 "files' names are the labels; unset corpus.label_column, or set corpus.path to one "
                                 ".jsonl or .parquet file with that column")
        for file in files:
            if file.stat().st_size == 0:
                raise _no_documents(file, "empty")
        return [(p, p.stem) for p in files]
    if not path.exists():
        raise NeuronmapError(f"{path}: corpus not found (corpus.path)")
    if path.suffix not in FORMATS:
        raise NeuronmapError(f"{path}: corpus file must be {', '.join(FORMATS)}")
    if label_column is not None and path.suffix == ".txt":
        raise NeuronmapError(f"corpus.label_column {label_column!r} cannot apply to {path}: a .txt file has no "
                             "columns (label .txt files by their names in a corpus folder: de.txt, en.txt)")
    if path.stat().st_size == 0:
        raise NeuronmapError(f"{path}: corpus file is empty")
    return [(path, None)]


def _no_documents(file: Path, why: str) -> NeuronmapError:
    return NeuronmapError(f"{file}: {why}, so the label {file.stem!r} has no documents and would drop out of the "
                          "labels compared: give it text, or remove the file")


def read_documents(path: str | Path, text_column: str = "text", label_column: str | None = None) -> list[Document]:
    documents = []
    for file, label in corpus_files(path, label_column):
        found = len(documents)
        for index, (text, row_label) in enumerate(_read_file(file, text_column, label_column)):
            if text.strip():
                documents.append(Document(f"{file.name}:{index}", label if label is not None else row_label, text))
        if label is not None and len(documents) == found:
            raise _no_documents(file, "no document in it holds text")
    if not documents:
        raise NeuronmapError(f"{path}: corpus holds no text")
    return documents


def _read_file(file: Path, text_column: str, label_column: str | None):
    if file.suffix == ".txt":
        text = _read_text(file)
        return [(block.strip("\n"), NO_LABEL) for block in re.split(r"\n[ \t]*\n", text)]
    if file.suffix == ".jsonl":
        return _read_jsonl(file, text_column, label_column)
    return _read_parquet(file, text_column, label_column)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise NeuronmapError(f"{file}: not UTF-8 text (byte {error.start})") from None


def _read_jsonl(file: Path, text_column: str, label_column: str | None):
    rows, labelled = [], False
    for number, line in enumerate(_read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise NeuronmapError(f"{file}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
            raise NeuronmapError(f"{file}:{number}: no string field {text_column!r} (corpus.text_column)")
        rows.append((row[text_column], _label(row.get(label_column) if label_column else None, file, number)))
        labelled = labelled or (label_column is not None and label_column in row)
    if label_column is not None and rows and not labelled:
        raise NeuronmapError(f"{file}: no line has the field {label_column!r} (corpus.label_column)")
    return rows


def _read_parquet(file: Path, text_column: str, label_column: str | None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        names = pq.read_schema(file).names
        columns = [text_column] + ([label_column] if label_column else [])
        for column, key in ((text_column, "text_column"), (label_column, "label_column")):
            if column is not None and column not in names:
                raise NeuronmapError(f"{file}: no column {column!r} (corpus.{key}; it has {', '.join(names)})")
        table = pq.read_table(file, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise NeuronmapError(f"{file}: not a readable Parquet file: {error}") from None
    if not pa.types.is_string(table.schema.field(text_column).type) and \
            not pa.types.is_large_string(table.schema.field(text_column).type):
        raise NeuronmapError(f"{file}: column {text_column!r} is {table.schema.field(text_column).type}, not text")
    texts = [t or "" for t in table.column(text_column).to_pylist()]
    labels = table.column(label_column).to_pylist() if len(columns) > 1 else [None] * len(texts)
    return [(text, _label(label, file, row)) for row, (text, label) in enumerate(zip(texts, labels), 1)]


def _label(value, file: Path, where: int) -> str:
    if value is None:
        return NO_LABEL
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise NeuronmapError(f"{file}:{where}: label {value!r} is not a string (corpus.label_column)")
    return str(value)
