"""The labeled text of the downstream probe: a user's JSONL file, or a set built from Python itself.

**The built-in set** is made at run time from the standard library's own source files (present in
every CPython install that ships its ``.py`` files): the docstrings of the modules, classes and
functions of six packages, each labeled with the package it documents (``asyncio``, ``email``,
``importlib``, ``logging``, ``unittest``, ``xml``). The text is real English written by people, the
labels are facts, and none of it is in the built-in pre-training corpus (the language reference,
``pydoc_data.topics``). Test code is left out, and so are docstrings shorter than
``MIN_WORDS`` words and texts found under two labels.

**The split** is by a hash of each text: the same on every run and machine, independent of file
order, and a text that occurs twice lands on one side only.
"""

import ast
from collections import Counter
from dataclasses import dataclass
import functools
import hashlib
import json
from pathlib import Path
import sysconfig

from scratchlm.compare.config import ProbeSpec
from scratchlm.data.sources import decoded_lines
from scratchlm.errors import ScratchLMError

BUILTIN_PACKAGES = ("asyncio", "email", "importlib", "logging", "unittest", "xml")
"""Standard-library packages whose docstrings make the built-in probe set; each is its own label."""

MIN_WORDS = 8
"""Shorter docstrings ("Return the name.") say too little about their package to be fair examples."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass
class ProbeSet:
    """A labeled set split into train and test."""

    train: list[Example]
    test: list[Example]
    labels: list[str]
    """Every label, sorted: class k is ``labels[k]``."""
    source: str
    """Where the examples came from, for the report."""

    @property
    def majority_label(self) -> str:
        return Counter(e.label for e in self.train).most_common(1)[0][0]

    @property
    def majority_rate(self) -> float:
        """Test accuracy of always answering the most frequent training label."""
        return sum(e.label == self.majority_label for e in self.test) / len(self.test)


# --- reading -----------------------------------------------------------------------------------


def builtin_examples() -> list[Example]:
    """Docstrings of ``BUILTIN_PACKAGES``, labeled by package, in a fixed order."""
    return list(read_builtin_examples())


@functools.cache
def read_builtin_examples() -> tuple[Example, ...]:
    """The parse of the sources, done once per process (a second or so)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    missing = [name for name in BUILTIN_PACKAGES if not (stdlib / name / "__init__.py").is_file()]
    if missing:
        raise ScratchLMError(
            f"the built-in probe set reads the standard library's source files, but {stdlib} lacks "
            f"{', '.join(missing)}; pass a labeled JSONL file with --probe.data FILE"
        )
    examples = [
        Example(text, package)
        for package in BUILTIN_PACKAGES
        for path in sorted((stdlib / package).rglob("*.py"))
        if "test" not in path.relative_to(stdlib).parts[1:]
        for text in docstrings(path)
    ]
    return tuple(without_conflicts(examples))


def docstrings(path: Path) -> list[str]:
    """The module, class and function docstrings of one source file with at least ``MIN_WORDS`` words."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    texts = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return [text for text in texts if text and len(text.split()) >= MIN_WORDS]


def without_conflicts(examples: list[Example]) -> list[Example]:
    """Each text once; texts that carry two different labels are dropped."""
    labels: dict[str, set[str]] = {}
    for example in examples:
        labels.setdefault(example.text, set()).add(example.label)
    seen: set[str] = set()
    kept = []
    for example in examples:
        if len(labels[example.text]) == 1 and example.text not in seen:
            seen.add(example.text)
            kept.append(example)
    return kept


def jsonl_examples(path: str, text_field: str, label_field: str) -> list[Example]:
    """One example per non-empty line of a JSONL file (``.gz`` too); any bad line stops with its number."""
    if not Path(path).is_file():
        raise ScratchLMError(f"--probe.data {path} does not exist; pass a labeled JSONL file")
    examples = []
    for number, line in decoded_lines(path, "strict"):
        if line.strip():
            examples.append(example_of(line, f"{path}:{number}", text_field, label_field))
    return examples


def example_of(line: str, where: str, text_field: str, label_field: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ScratchLMError(f"{where}: malformed JSON ({error.msg}, column {error.colno}); fix or remove that line") from None
    if not isinstance(record, dict):
        raise ScratchLMError(f"{where}: not a JSON object; each line must hold one object with text and label fields")
    fields = ", ".join(map(str, record)) or "none"
    if text_field not in record:
        raise ScratchLMError(f"{where}: no {text_field!r} field (fields: {fields}); pass --probe.text_field NAME")
    if label_field not in record:
        raise ScratchLMError(f"{where}: no {label_field!r} field (fields: {fields}); pass --probe.label_field NAME")
    text, label = record[text_field], record[label_field]
    if not isinstance(text, str) or not text.strip():
        raise ScratchLMError(f"{where}: field {text_field!r} must be a non-empty string; fix or remove that line")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ScratchLMError(f"{where}: field {label_field!r} must be a string or an integer; fix or remove that line")
    return Example(text, str(label))


# --- splitting ---------------------------------------------------------------------------------


def split_score(text: str) -> float:
    """A number in [0, 1) fixed by the text alone (personalised, so it is independent of the
    pre-training corpus's held-out hash)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"probe-split").digest()
    return int.from_bytes(digest, "big") / 2**64


def load_probe_set(spec: ProbeSpec) -> ProbeSet:
    """The probe's examples, split into train (score >= test_fraction) and test, each capped to
    its lowest-scoring examples (a fixed random subset)."""
    if spec.data is None:
        examples, source = builtin_examples(), f"built-in: docstrings of {', '.join(BUILTIN_PACKAGES)}, labeled by package"
    else:
        examples, source = jsonl_examples(spec.data, spec.text_field, spec.label_field), spec.data
    scored = sorted(examples, key=lambda e: split_score(e.text))
    test = [e for e in scored if split_score(e.text) < spec.test_fraction][: spec.max_test]
    train = [e for e in scored if split_score(e.text) >= spec.test_fraction][: spec.max_train]
    labels = sorted({e.label for e in train})
    if len(labels) < 2:
        raise ScratchLMError(
            f"{source}: the training split holds {len(labels)} label(s) in field {spec.label_field!r}; "
            "a probe needs at least two (add examples or check --probe.label_field)"
        )
    test = [e for e in test if e.label in labels]  # a label never trained on cannot be predicted
    if not test:
        raise ScratchLMError(f"{source}: no test examples; raise --probe.test_fraction or add examples")
    return ProbeSet(train, test, labels, source)
