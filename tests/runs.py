"""Running the real ``scratchlm`` command in tests."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

# A small model and few steps: enough to learn the built-in corpus's frequent words, fast on 2 cores.
TINY_FIT = [
    "--model.arch", "{n_layers: 2, d_model: 64, n_heads: 2, d_ff: 256}",
    "--tokenizer.vocab_size", "1000",
    "--data.block_size", "64",
    "--data.batch_size", "16",
    "--trainer.max_steps", "250",
    "--trainer.val_check_interval", "125",
    "--trainer.enable_progress_bar", "false",
    "--model.optim.warmup_steps", "20",
    "--model.optim.lr", "3e-3",
]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real ``scratchlm`` command in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True, cwd=ROOT
    )
    if check and result.returncode != 0:
        raise AssertionError(f"scratchlm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def run_main(capsys, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """What :func:`run_cli` returns, from the command's ``main`` run in this process, its output
    taken by pytest's ``capsys``: for tests about what the command does rather than about its
    process (each start of the command spends seconds importing Lightning)."""
    from scratchlm.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    captured = capsys.readouterr()
    result = subprocess.CompletedProcess(["scratchlm", *args], code, captured.out, captured.err)
    if check and code != 0:
        raise AssertionError(f"scratchlm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a stopped command printed for bad input, after checking it stopped as such
    a command must: exit status 2, no traceback, exactly one ``scratchlm: error:`` line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("scratchlm: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def fit_recipe(recipe: str, root: Path, *extra: str) -> tuple[Path, subprocess.CompletedProcess]:
    """(exported folder, completed process) of a short fit of ``recipe`` (``TINY_FIT``, then ``extra``)."""
    result = run_cli(
        "fit", "--config", str(RECIPES / recipe), "--trainer.default_root_dir", str(root), *TINY_FIT, *extra
    )
    return Path(result.stdout.strip().splitlines()[-1]), result


def mean_next_token_loss(model, tokenizer, text: str) -> float:
    """An HF causal LM's mean next-token loss on the first 256 tokens of ``text``."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def zen_of_python() -> str:
    """English text that ships with Python and is not in the built-in corpus."""
    import codecs
    import this  # noqa: F401  (prints the Zen on import; the text is kept rot13-encoded in this.s)

    return codecs.decode(this.s, "rot13")



# The shared part of the encoder-decoder tests' short fits (each adds its model and tokenizer).
SEQ2SEQ_FIT = [
    "--tokenizer.vocab_size", "500",
    "--data.block_size", "64",
    "--data.batch_size", "8",
    "--data.val_fraction", "0.02",
    "--trainer.max_steps", "12",
    "--trainer.val_check_interval", "12",
    "--trainer.enable_progress_bar", "false",
    "--model.optim.warmup_steps", "4",
]


def text2text_pipeline_is_our_greedy_decode(folder: Path, checkpoint: Path, text: str, start_role: str) -> None:
    """The transformers 4.x ``text2text-generation`` pipeline on an exported folder, asked for
    greedy decoding (its own default is 4 beams): its tokens are our own model's greedy decode of
    ``checkpoint`` from the tokenizer's ``start_role`` token, and its text is those tokens read
    back with the exported tokenizer."""
    from transformers import AutoTokenizer, pipeline

    from scratchlm.models.seq2seq import greedy_decode
    from scratchlm.training.checkpoint import TrainedModel

    generator = pipeline("text2text-generation", model=str(folder))
    [written] = generator(text, max_new_tokens=12, num_beams=1, do_sample=False)
    [written_ids] = generator(text, max_new_tokens=12, num_beams=1, do_sample=False, return_tensors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = TrainedModel.from_checkpoint(checkpoint).model
    inputs = tokenizer(text, return_tensors="pt")
    start, pad, eos = getattr(tokenizer, f"{start_role}_token_id"), tokenizer.pad_token_id, tokenizer.eos_token_id
    ours = greedy_decode(model, inputs.input_ids, None, start_id=start, max_new_tokens=12, eos_id=eos, pad_id=pad)[0]
    assert len(ours) > 2  # the model wrote something before end-of-text: there is text to compare
    assert written_ids["generated_token_ids"].tolist() == ours.tolist()
    assert written["generated_text"] == tokenizer.decode(ours, skip_special_tokens=True)


TEXT2TEXT_MISSING = (
    "this transformers has no text2text-generation pipeline (removed in transformers 5; "
    "AutoModelForSeq2SeqLM.generate() is tested instead)"
)
