"""Throughput logging: tokens/s and the model FLOP/s they amount to."""

import lightning as L
import pytest

from scratchlm import PretrainModule, TextDataModule, train_tokenizer
from scratchlm.training import TokenThroughput
from scratchlm.training.flops import flop_count


@pytest.mark.parametrize("family", ["gpt2", "bert", "t5"])
def test_tflops_are_tokens_per_second_times_the_models_flops_per_token(family, tmp_path):
    sentinels = 20 if family == "t5" else None
    tokenizer = str(train_tokenizer(None, tmp_path / "tok", vocab_size=300, family=family, sentinels=sentinels))
    module = PretrainModule(tokenizer=tokenizer, family=family, arch={"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64})
    data = TextDataModule(tokenizer=tokenizer, block_size=32, batch_size=4, val_fraction=0)
    trainer = L.Trainer(
        max_steps=4, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", callbacks=[TokenThroughput()],
    )
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    if family == "t5":  # per encoder position: each block of 32 is S encoder and T decoder tokens
        S, T = module.sequence_lengths(32)
        per_token = flop_count(module.model, "span", S, 1.0, lengths=(S, T)).per_token
    else:
        mask_rate = module.objective.masking.mask_rate if family == "bert" else 1.0
        per_token = flop_count(module.model, module.objective.name, 32, mask_rate).per_token
    assert float(metrics["train/tok_s"]) > 0
    assert float(metrics["train/tflops"]) == pytest.approx(float(metrics["train/tok_s"]) * per_token / 1e12, rel=1e-5)
    assert "train/mfu" not in metrics  # no known peak on a CPU
