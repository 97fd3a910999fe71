"""The data module: preflight errors that name the culprit, loaders that split the corpus across
ranks (a real two-process gloo group), and the batches a LightningModule receives."""

import json
import socket
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from numbered_corpus import BLOCK, ddp_resume_worker, ddp_worker, identities
from scratchlm.data import TextDataModule
from scratchlm.data.stream import validation_score
from scratchlm.errors import ScratchLMError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_processes_with_two_workers_each_see_every_document_once(numbered, tmp_path):
    corpus, texts, tokenizer = numbered
    out = tmp_path / "seen.json"
    mp.spawn(ddp_worker, args=(2, free_port(), str(corpus), tokenizer, BLOCK, str(out)), nprocs=2, join=True)
    per_rank = json.loads(out.read_text())
    train = [k for rank in per_rank for k in rank["train"]]
    val = [k for rank in per_rank for k in rank["val"]]
    held_out = {k for k, text in enumerate(texts) if validation_score(text) < 0.2}
    assert all(rank["train"] for rank in per_rank), "both ranks train"
    assert sorted(train) == sorted(set(range(len(texts))) - held_out)
    assert sorted(val) == sorted(held_out) and val


def test_a_resumed_ddp_stream_continues_without_repeating_or_skipping(numbered, tmp_path):
    """Two ranks with two workers each stop mid-epoch; fresh data modules loaded with the saved
    position finish the epoch: together they read every training document exactly once."""
    corpus, texts, tokenizer = numbered
    out = tmp_path / "seen.json"
    args = (2, free_port(), str(corpus), tokenizer, BLOCK, str(out), 2)
    mp.spawn(ddp_resume_worker, args=args, nprocs=2, join=True)
    per_rank = json.loads(out.read_text())
    assert all(rank["before"] and rank["after"] for rank in per_rank), "every rank reads on both sides"
    seen = [k for rank in per_rank for k in rank["before"] + rank["after"]]
    held_out = {k for k, text in enumerate(texts) if validation_score(text) < 0.2}
    assert sorted(seen) == sorted(set(range(len(texts))) - held_out)


def test_batches_are_stacked_tensors_with_an_attention_mask(numbered):
    corpus, _, tokenizer = numbered
    data = TextDataModule(paths=[str(corpus)], tokenizer=tokenizer, block_size=40, batch_size=3, train_epochs=1)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == batch["doc_ids"].shape == batch["attention_mask"].shape == (3, 40)
    assert batch["input_ids"].dtype == torch.int64 and batch["doc_ids"].dtype == torch.int32
    assert torch.equal(batch["attention_mask"], batch["doc_ids"] >= 0)
    last = list(data.train_dataloader())[-1]
    assert not last["attention_mask"].all(), "the finite stream's last block is padded"
    data.collate_fn = lambda blocks: {"n": len(blocks)}  # what the training module does
    assert next(iter(data.train_dataloader())) == {"n": 3}


def test_the_rank_comes_from_the_attached_trainer(numbered):
    corpus, texts, tokenizer = numbered
    vocab = {i: t for t, i in numbered_vocab(tokenizer).items()}
    shares = []
    for rank in range(2):
        data = TextDataModule(
            paths=[str(corpus)], tokenizer=tokenizer, val_fraction=0, block_size=BLOCK, train_epochs=1
        )
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        shares.append([k for b in data.train_dataloader() for k in identities(b["input_ids"].numpy(), vocab)])
    assert len(shares[0]) == len(shares[1]) == len(texts) // 2
    assert sorted(shares[0] + shares[1]) == list(range(len(texts)))


def numbered_vocab(tokenizer: str) -> dict[str, int]:
    from scratchlm.tokenizer import TokenizerInfo

    return TokenizerInfo.load(tokenizer).tokenizer().get_vocab()


def test_separate_validation_files_and_an_empty_held_out_split(numbered, tmp_path):
    corpus, _, tokenizer = numbered
    val_file = tmp_path / "val.txt"
    val_file.write_text("doc nine nine nine the cat\n")
    data = TextDataModule(paths=[str(corpus)], tokenizer=tokenizer, val_paths=[str(val_file)], block_size=BLOCK)
    data.setup("fit")
    (batch,) = list(data.val_dataloader())
    assert identities(batch["input_ids"].numpy(), {i: t for t, i in numbered_vocab(tokenizer).items()}) == [999]

    tiny = tmp_path / "two.txt"
    tiny.write_text("doc zero zero one\n\ndoc zero zero two\n")
    data = TextDataModule(paths=[str(tiny)], tokenizer=tokenizer, val_fraction=0.001)
    with pytest.warns(UserWarning, match=r"two\.txt.*validation is skipped.*--data\.val_paths"):
        data.setup("fit")
    assert data.val_dataloader() == []


def test_a_trainer_fits_on_it_with_and_without_validation(numbered):
    corpus, _, tokenizer = numbered

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(512, 4)
            self.validated = 0

        def training_step(self, batch, batch_idx):
            return self.embedding(batch["input_ids"]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.validated += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for val_fraction in (0.0, 0.3):
        data = TextDataModule(
            paths=[str(corpus)], tokenizer=tokenizer, val_fraction=val_fraction, block_size=BLOCK, batch_size=2
        )
        trainer = L.Trainer(
            max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        probe = Probe()
        trainer.fit(probe, data)
        assert trainer.global_step == 4
        assert (probe.validated > 0) == (val_fraction > 0)
    assert "numbered.jsonl" in data.describe()


def test_preflight_errors_name_the_culprit(numbered, tmp_path):
    corpus, _, tokenizer = numbered
    (tmp_path / "empty.txt").write_text("  \n")
    few = tmp_path / "few.txt"
    few.write_text("one\n\ntwo\n\nthree\n")
    missing, empty = str(tmp_path / "missing.jsonl"), str(tmp_path / "empty.txt")
    cases = [
        ({"paths": [str(corpus)]}, "pass --data.tokenizer DIR"),
        ({"paths": [str(corpus)], "tokenizer": str(tmp_path / "no-tokenizer")}, "no-tokenizer does not exist"),
        ({"paths": [missing], "tokenizer": tokenizer}, f"'{missing}' matches no file"),
        ({"paths": [empty], "tokenizer": tokenizer}, f"no documents in {empty}"),
        ({"paths": [str(corpus)], "val_paths": [empty], "tokenizer": tokenizer}, f"no documents in {empty}"),
        ({"paths": [str(few)], "tokenizer": tokenizer, "val_fraction": 0, "num_workers": 4},
         "3 documents, fewer than the 4 streams"),
        ({"paths": [str(few)], "tokenizer": tokenizer, "val_fraction": 0.999999},
         "--data.val_fraction=0.999999 holds out every document"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(ScratchLMError) as error:
            TextDataModule(**kwargs).setup("fit")
        assert expected in str(error.value), (kwargs, str(error.value))


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"val_fraction": 1.0}, "--data.val_fraction=1.0"),
        ({"block_size": 0}, "--data.block_size=0"),
        ({"batch_size": 0}, "--data.batch_size=0"),
        ({"num_workers": -1}, "--data.num_workers=-1"),
        ({"errors": "ignore"}, "--data.errors='ignore'"),
        ({"train_epochs": 0}, "--data.train_epochs=0"),
    ],
)
def test_impossible_settings_name_the_flag(kwargs, flag):
    with pytest.raises(ScratchLMError, match=flag.replace(".", r"\.")):
        TextDataModule(**kwargs)
