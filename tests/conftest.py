"""Shared fixtures: tiny runs of the real CLI, trained once per session and reused."""

# Lightning's loggers get a handler on sys.stderr when lightning.pytorch is first imported. The
# package imports it only when a command trains, which in a test may be under pytest's output
# capture: the handler would then keep a capture stream that is closed after that test, and every
# later run would print "--- Logging error ---" tracebacks. Imported here, it binds the real stderr.
import lightning.pytorch  # noqa: F401
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
