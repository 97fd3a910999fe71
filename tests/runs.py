"""Running the real ``scratchlm`` command in tests."""

import subprocess
import sys
from pathlib import Path

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


def fit_recipe(recipe: str, root: Path) -> tuple[Path, subprocess.CompletedProcess]:
    result = run_cli(
        "fit", "--config", str(RECIPES / recipe), "--trainer.default_root_dir", str(root), *TINY_FIT
    )
    return Path(result.stdout.strip().splitlines()[-1]), result


def zen_of_python() -> str:
    """English text that ships with Python and is not in the built-in corpus."""
    import codecs
    import this  # noqa: F401  (prints the Zen on import; the text is kept rot13-encoded in this.s)

    return codecs.decode(this.s, "rot13")


