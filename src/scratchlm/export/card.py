"""The model card (README.md) of an exported folder: what the model is, how it was trained, how to load it."""

from dataclasses import asdict
from typing import Any

TRAINING_ROWS: dict[str, str] = {
    "objective": "Objective",
    "corpus": "Corpus",
    "steps": "Optimizer steps",
    "tokens_seen": "Tokens seen",
    "train_loss": "Final training loss",
    "val_loss": "Final validation loss",
    "val_ppl": "Final validation perplexity",
}
"""Keys of the ``card`` dict the card knows by name -> row label. Other keys get a row as they are."""

PIPELINE_TASK = {
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForSeq2SeqLM": "text2text-generation",
}
"""HF auto class -> the ``pipeline`` task and Hub ``pipeline_tag`` it serves. transformers 5 removed
the ``text2text-generation`` pipeline (the Hub tag remains), so encoder-decoder cards show
``generate()`` instead of a pipeline (see ``usage_section``)."""


def model_card(
    *,
    family: str,
    hf_class: str,
    auto_class: str,
    config: Any,
    num_params: int,
    num_params_non_embedding: int,
    card: dict[str, Any],
) -> str:
    """Markdown text of README.md. ``config`` is the model's config dataclass; ``card`` holds
    whatever facts about the training run are known (see ``TRAINING_ROWS``); absent or None
    keys are left out."""
    task = PIPELINE_TASK[auto_class]
    sections = [
        front_matter(family, task),
        f"# {family} model pre-trained from scratch with scratchlm\n\n"
        f"A `{hf_class}` checkpoint for the stock `transformers` classes (no `trust_remote_code`).",
        architecture_section(hf_class, config, num_params, num_params_non_embedding),
        training_section(card),
        usage_section(auto_class, task, fine_tuning=family == "bert"),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def front_matter(family: str, task: str) -> str:
    return f"---\nlibrary_name: transformers\npipeline_tag: {task}\ntags:\n- scratchlm\n- {family}\n---"


def architecture_section(hf_class: str, config: Any, num_params: int, num_params_non_embedding: int) -> str:
    rows = [("HF class", f"`{hf_class}`"), ("Parameters", f"{num_params:,}"),
            ("Parameters without embeddings", f"{num_params_non_embedding:,}")]
    rows += [(name, str(value)) for name, value in asdict(config).items()]
    return "## Architecture\n\n" + table(rows)


def training_section(card: dict[str, Any]) -> str:
    rows = []
    for key, value in card.items():
        if value is None or key == "family":
            continue
        label = TRAINING_ROWS.get(key, key)
        rows.append((label, format_value(value)))
    return "## Training\n\n" + table(rows) if rows else ""


def usage_section(auto_class: str, task: str, fine_tuning: bool) -> str:
    if auto_class == "AutoModelForSeq2SeqLM":
        return "## How to load\n\n" + seq2seq_snippet()
    snippet = (
        "```python\n"
        f"from transformers import {auto_class}, AutoTokenizer, pipeline\n\n"
        'path = "path/to/this/folder"\n'
        "tokenizer = AutoTokenizer.from_pretrained(path)\n"
        f"model = {auto_class}.from_pretrained(path)\n"
        f'pipe = pipeline("{task}", model=path)\n'
        "```"
    )
    text = "## How to load\n\n" + snippet
    if fine_tuning:
        text += (
            "\n\nTo fine-tune for classification, load it with "
            "`AutoModelForSequenceClassification.from_pretrained(path, num_labels=N)`: only the new "
            "classifier is initialised. The pooler was not trained (MLM does not train it); it is "
            "exported as the identity, so the classifier reads tanh of the [CLS] hidden state. "
            "Loading with `AutoModelForMaskedLM` lists the two pooler weights as unexpected; "
            "that is harmless."
        )
    return text


def seq2seq_snippet() -> str:
    """Loading an encoder-decoder and generating with it: there is no pipeline for it in
    transformers 5, and ``generate()`` reads the decoder's start token from generation_config.json."""
    return (
        "```python\n"
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n\n"
        'path = "path/to/this/folder"\n'
        "tokenizer = AutoTokenizer.from_pretrained(path)\n"
        "model = AutoModelForSeq2SeqLM.from_pretrained(path)\n"
        'inputs = tokenizer(["some text"], return_tensors="pt")\n'
        "print(tokenizer.batch_decode(model.generate(**inputs, max_new_tokens=20)))\n"
        "```"
    )


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table(rows: list[tuple[str, str]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {label} | {escape_cell(value)} |" for label, value in rows]
    return "\n".join(lines)


def escape_cell(text: str) -> str:
    """A table cell on one line, with no bare ``|`` to end it early."""
    return " ".join(text.split()).replace("|", "\\|")
