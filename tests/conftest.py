"""Shared fixtures: tiny runs of the real CLI, trained once per session and reused."""

import pytest

from runs import fit_recipe


@pytest.fixture(scope="session")
def gpt2_run(tmp_path_factory):
    """(exported folder, run dir, completed process) of a tiny GPT-2 fit on the built-in corpus."""
    root = tmp_path_factory.mktemp("gpt2-run")
    folder, result = fit_recipe("gpt2-tiny.yaml", root)
    return folder, root, result


@pytest.fixture(scope="session")
def bert_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert-run")
    folder, result = fit_recipe("bert-tiny.yaml", root)
    return folder, root, result
