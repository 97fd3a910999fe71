"""``--model.compile``: the model trains compiled, with the plain model's names; where it cannot
compile, training goes on uncompiled after one warning."""

import functools

import lightning as L
import pytest
import torch

from scratchlm import PretrainModule, TextDataModule, train_tokenizer

ARCH = {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64, "dropout": 0.0}  # inductor draws its own dropout masks


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return str(train_tokenizer(None, tmp_path_factory.mktemp("compile") / "tok", vocab_size=300, family="gpt2"))


class Recorded(PretrainModule):
    """Keeps each training loss."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses = [*getattr(self, "losses", []), loss.item()]
        return loss


def train(tokenizer, root, compile: bool, steps: int = 3) -> Recorded:
    L.seed_everything(0, verbose=False)
    module = Recorded(tokenizer=tokenizer, family="gpt2", arch=ARCH, compile=compile)
    data = TextDataModule(tokenizer=tokenizer, block_size=32, batch_size=4, val_fraction=0)
    trainer = L.Trainer(
        max_steps=steps, default_root_dir=root, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(module, data)
    return module


def test_a_model_that_cannot_compile_trains_uncompiled_after_one_warning(tokenizer, tmp_path, monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile could not compile the model .RuntimeError: no C.. compiler found.; training continues uncompiled"):
        broken = train(tokenizer, tmp_path / "a", compile=True)
    plain = train(tokenizer, tmp_path / "b", compile=False)
    assert broken.losses == plain.losses and len(plain.losses) == 3


def test_a_compiled_model_trains_like_the_plain_one_under_the_same_names(tokenizer, tmp_path, monkeypatch):
    # Dynamo traces the model and AOTAutograd splits forward and backward as with the default
    # inductor backend, without inductor's C++ code generation (about a minute on two cores; it
    # matched the plain model to 1e-4 as well when last measured).
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = train(tokenizer, tmp_path / "a", compile=True)
    plain = train(tokenizer, tmp_path / "b", compile=False)
    assert compiled.model._compiled_call_impl is not None, "the model really ran compiled"
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert compiled.losses == pytest.approx(plain.losses, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "modernbert"])
@pytest.mark.parametrize("packed", [False, True])
def test_rotary_tables_reach_the_compiled_graph_as_inputs(family, packed):
    """The compiler never traces the rotary cosines and sines (``layers.rope_cos_sin``): traced,
    Inductor would recompute them in every kernel that reads them. The captured graphs hold no
    cos or sin, and the compiled model computes what the plain one does."""
    from scratchlm.models import build_config, build_model

    graphs = []

    def record(graph_module, example_inputs):
        graphs.append({str(node.target) for node in graph_module.graph.nodes})
        return graph_module.forward

    torch.manual_seed(0)
    model = build_model(family, build_config(family, "tiny", vocab_size=300, **ARCH)).eval()
    ids = torch.randint(300, (2, 24))
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24]) if packed else None
    with torch.no_grad():
        want = model(ids, doc_ids=doc_ids)
        got = torch.compile(model, backend=record)(ids, doc_ids=doc_ids)
    torch.testing.assert_close(got, want)
    assert graphs and any(len(targets) > 20 for targets in graphs), "the blocks were not captured"
    traced = sorted(t for targets in graphs for t in targets if "cos" in t or "sin" in t)
    assert not traced, f"rotary tables traced into a graph: {traced}"
