"""The probe's labeled text: honest labels in the built-in set, a fixed split, clear errors."""

import gzip
import json
import sysconfig
from pathlib import Path

import pytest

from scratchlm.compare.config import ProbeSpec
from scratchlm.compare.probe_data import BUILTIN_PACKAGES, builtin_examples, load_probe_set
from scratchlm.data import iter_documents, resolve_sources
from scratchlm.errors import ScratchLMError


@pytest.fixture(scope="module")
def builtin():
    return builtin_examples()


def test_builtin_examples_are_docstrings_found_in_the_package_they_are_labeled_with(builtin):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert {e.label for e in builtin} == set(BUILTIN_PACKAGES)
    assert len(builtin) > 600
    sources = {package: "\n".join(p.read_text(encoding="utf-8") for p in (stdlib / package).rglob("*.py"))
               for package in BUILTIN_PACKAGES}
    for example in builtin[::25]:
        first_line = example.text.splitlines()[0]
        assert first_line in sources[example.label], (example.label, first_line)


def test_builtin_examples_are_not_in_the_pretraining_corpus(builtin):
    corpus = "\n".join(d.text for d in iter_documents(resolve_sources(None)))
    found = sum(e.text in corpus for e in builtin)
    assert found <= len(builtin) // 100


def test_the_split_is_fixed_disjoint_and_capped():
    spec = ProbeSpec(test_fraction=0.2)
    first, again = load_probe_set(spec), load_probe_set(spec)
    assert first.train == again.train and first.test == again.test
    assert not {e.text for e in first.train} & {e.text for e in first.test}
    share = len(first.test) / (len(first.train) + len(first.test))
    assert 0.15 < share < 0.25
    capped = load_probe_set(ProbeSpec(max_train=50, max_test=20))
    assert len(capped.train) == 50 and len(capped.test) == 20
    assert capped.train == first.train[:50]  # a cap keeps a fixed subset
    assert 0 < first.majority_rate < 0.5  # six labels, none dominant


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_a_labeled_jsonl_gz_file_is_read_with_its_field_names(tmp_path):
    records = [{"body": f"text number {i} about {'cats' if i % 2 else 'dogs'}", "topic": i % 2} for i in range(60)]
    path = tmp_path / "probe.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    probe = load_probe_set(ProbeSpec(data=str(path), text_field="body", label_field="topic"))
    assert probe.labels == ["0", "1"]
    assert len(probe.train) + len(probe.test) == 60


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([{"text": "fine", "label": "a"}, {"text": "no label here"}], ["bad.jsonl:2", "'label'", "--probe.label_field"]),
        ([{"label": "a"}], ["bad.jsonl:1", "'text'", "--probe.text_field"]),
        ([{"text": "fine", "label": "a"}, '{"text": "oops"'], ["bad.jsonl:2", "malformed JSON"]),
        ([{"text": "fine", "label": [1]}], ["bad.jsonl:1", "string or an integer"]),
        ([{"text": f"only one label {i}", "label": "a"} for i in range(20)], ["at least two"]),
    ],
)
def test_bad_probe_files_stop_with_one_clear_error(tmp_path, lines, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ScratchLMError) as error:
        load_probe_set(ProbeSpec(data=str(path)))
    for text in expected:
        assert text in str(error.value)


def test_a_missing_probe_file_is_named(tmp_path):
    with pytest.raises(ScratchLMError, match="nothing.jsonl does not exist"):
        load_probe_set(ProbeSpec(data=str(tmp_path / "nothing.jsonl")))
