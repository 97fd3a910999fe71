"""Fixtures of the data tests: a numbered corpus and a tokenizer trained on it."""

from pathlib import Path
import sys

import pytest

# Helpers are imported by plain name: processes spawned by the DDP test can import them the same way
# (spawned children inherit sys.path), which a test module's pytest-given name does not allow.
# Appended, not prepended: nothing here may shadow a module found elsewhere (tests/conftest.py).
sys.path.append(str(Path(__file__).parent))

from numbered_corpus import BLOCK, MARKER_WORDS, write_corpus  # noqa: E402

from scratchlm.tokenizer import TokenizerInfo, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def numbered(tmp_path_factory):
    """(corpus path, texts, tokenizer folder): 50 documents, each BLOCK tokens with its end-of-text."""
    root = tmp_path_factory.mktemp("numbered")
    corpus = root / "numbered.jsonl"
    texts = write_corpus(corpus, 50, lambda k: BLOCK - 1 - MARKER_WORDS)
    tokenizer = train_tokenizer(
        [str(corpus)], root / "tokenizer", kind="wordpiece", family="gpt2", vocab_size=300, min_frequency=1
    )
    raw = TokenizerInfo.load(tokenizer).tokenizer()
    lengths = {len(raw.encode(t).ids) for t in texts}
    assert lengths == {BLOCK - 1}, f"every word should be one token; got lengths {lengths}"
    return corpus, texts, str(tokenizer)
