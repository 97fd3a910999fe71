"""The BART family: the encoder-decoder contract, masks, causality, shared embeddings, config checks."""

import pytest
import torch

from scratchlm.errors import ScratchLMError
from scratchlm.models import FAMILIES, Bart, BartConfig, build_config, build_model

VOCAB = 300


def tiny(**overrides) -> Bart:
    torch.manual_seed(0)
    return build_model("bart", build_config("bart", "tiny", vocab_size=VOCAB, **overrides)).eval()


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> Bart:
    return tiny()


def test_contract_shapes(model):
    source, target = ids(2, 11, 1), ids(2, 7, 2)
    encoded = model.encode(source, torch.ones(2, 11, dtype=torch.bool))
    assert encoded.shape == (2, 11, 128)
    decoded = model.decode(target, encoded, torch.ones(2, 11, dtype=torch.bool))
    assert decoded.shape == (2, 7, 128)
    assert model.logits(decoded).shape == (2, 7, VOCAB)
    torch.testing.assert_close(model(source, None, target), decoded)
    assert Bart.is_causal is False and Bart.is_encoder_decoder is True
    # One buffer, the output bias (DDP broadcasts it from rank 0 at every forward: V floats).
    assert [name for name, _ in model.named_buffers()] == ["logit_bias"]


def test_registry_entry():
    spec = FAMILIES["bart"]
    assert (spec.model, spec.config, spec.causal, spec.objective) == (Bart, BartConfig, False, "infill")


def test_decoder_does_not_see_the_future(model):
    source, target = ids(1, 9, 3), ids(1, 10, 4)
    changed = target.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(source, None, target), model(source, None, changed)
    torch.testing.assert_close(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_encoder_padding_is_invisible(model):
    """Whatever sits at masked encoder positions changes nothing the decoder computes."""
    source, target = ids(2, 12, 5), ids(2, 6, 6)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 5:] = False
    other = source.clone()
    other[1, 5:] = (other[1, 5:] + 7) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(source, mask, target), model(other, mask, target))
        assert not torch.allclose(model(source, None, target)[1], model(other, None, target)[1])


def test_decoder_mask_hides_padding_from_real_positions(model):
    """A decoder attention mask with padding in the middle: real positions ignore the padded ones."""
    source, target = ids(1, 8, 7), ids(1, 8, 8)
    decoder_mask = torch.ones(1, 8, dtype=torch.bool)
    decoder_mask[0, 2:4] = False
    other = target.clone()
    other[0, 2:4] = (other[0, 2:4] + 3) % VOCAB
    with torch.no_grad():
        a, b = model(source, None, target, decoder_mask), model(source, None, other, decoder_mask)
    torch.testing.assert_close(a[0, decoder_mask[0]], b[0, decoder_mask[0]])
    full = torch.ones_like(decoder_mask)
    with torch.no_grad():
        torch.testing.assert_close(model(source, None, target, full), model(source, None, target), atol=1e-5, rtol=1e-5)


def test_one_embedding_matrix_serves_encoder_decoder_and_head(model):
    hidden = torch.randn(3, 128)
    torch.testing.assert_close(model.logits(hidden), hidden @ model.tok_emb.weight.T)
    d, f, L, P, V = 128, 512, 2, 256, VOCAB
    block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # attention, MLP, two LayerNorms
    cross = 4 * d * d + 4 * d + 2 * d  # cross-attention and its LayerNorm
    embeddings = V * d + 2 * (P * d + 2 * d)  # one token table, two position tables + norms
    assert model.num_params() == embeddings + L * block + L * (block + cross)
    assert model.num_params(exclude_embeddings=True) == model.num_params() - V * d - 2 * P * d


def test_decoder_layers_follow_the_encoder_unless_set():
    assert build_config("bart", "tiny", vocab_size=VOCAB, n_layers=3).n_decoder_layers == 3
    config = build_config("bart", "tiny", vocab_size=VOCAB, n_layers=3, n_decoder_layers=1)
    assert len(build_model("bart", config).decoder_blocks) == 1


def test_presets():
    sizes = {
        size: (c.d_model, c.n_layers, c.n_decoder_layers, c.n_heads, c.d_ff, c.max_positions)
        for size in ("tiny", "small", "base")
        for c in [build_config("bart", size, vocab_size=100)]
    }
    assert sizes == {
        "tiny": (128, 2, 2, 4, 512, 256),
        "small": (512, 6, 6, 8, 2048, 512),
        "base": (768, 6, 6, 12, 3072, 1024),  # BART-base
    }


@pytest.mark.parametrize("field, value", [("n_decoder_layers", 0), ("n_heads", 0), ("dropout", 1.0)])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ScratchLMError, match=rf"model\.arch\.{field}="):
        BartConfig(vocab_size=VOCAB, **{field: value})


def test_inputs_longer_than_the_positions_are_refused(model):
    with pytest.raises(ScratchLMError, match="sequence length 257 exceeds the model's max_positions=256"):
        model.encode(ids(1, 257, 9))
    with pytest.raises(ScratchLMError, match="sequence length 257 exceeds"):
        model.decode(ids(1, 257, 9), torch.zeros(1, 4, 128), None)


def test_trains_on_a_copy_task():
    """Gradients reach both stacks: a one-block model learns to copy a short input."""
    torch.manual_seed(0)
    model = build_model(
        "bart", build_config("bart", "tiny", vocab_size=20, d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0)
    )
    source = torch.randint(3, 20, (16, 6), generator=torch.Generator().manual_seed(0))
    decoder_input = torch.cat([torch.full((16, 1), 2), source[:, :-1]], dim=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        logits = model.logits(model(source, None, decoder_input))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), source.flatten())
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_the_output_bias_is_fitted_to_the_first_batch_of_a_run(tmp_path):
    """A fresh run sets BART's output bias to the log unigram frequencies of its first batch's
    targets (a model that otherwise collapses its encoder to learn them); logits use it."""
    import lightning as L

    from scratchlm import PretrainModule, TextDataModule, train_tokenizer

    tokenizer = str(train_tokenizer(None, tmp_path / "tok", vocab_size=300, family="bart"))
    module = PretrainModule(tokenizer=tokenizer, family="bart", arch={"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64})
    data = TextDataModule(tokenizer=tokenizer, block_size=32, batch_size=4, val_fraction=0)
    seen = []

    class FirstBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch["labels"].clone())

    trainer = L.Trainer(
        max_steps=2, default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", callbacks=[FirstBatch()],
    )
    assert not module.model.logit_bias.any()
    trainer.fit(module, data)
    labels = seen[0][seen[0] >= 0]
    counts = torch.bincount(labels, minlength=module.model.config.vocab_size).float() + 1
    torch.testing.assert_close(module.model.logit_bias, counts.log() - counts.sum().log())  # the first batch only
    hidden = torch.randn(3, 32)
    torch.testing.assert_close(module.model.logits(hidden), hidden @ module.model.tok_emb.weight.T + module.model.logit_bias)
