"""TRL's trainers with KOALA (koala_hf.integrations.trl): the per-token losses of what SFTTrainer trains on,
read from its own forward (one per micro-batch), for each loss type; other orders and trainers are exact too."""

import copy
import logging

import pytest
import torch
from datasets import Dataset

trl = pytest.importorskip("trl")

from koala_hf import KOALAPlusPlus, KoalaSFTTrainer, KoalaTrainer  # noqa: E402
from tests.helpers import RecordingMeasurements, tiny_gpt2, word_texts, word_tokenizer  # noqa: E402


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1,
                    report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, max_length=16, seed=0)
    return trl.SFTConfig(**{**settings, **overrides})


def by_hand(model, trainer, loss_type):
    """The step's loss over its 8 examples from the untouched model's logits, token by token (no TRL code)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.double()
    labels = batch["labels"][:, 1:]
    log_p = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[labels != -100]
    terms = -log_p if loss_type == "nll" else -log_p * log_p.exp()
    return terms.mean(), (terms**2).mean()


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_measures_the_per_token_losses_it_trains_on_with_one_forward_per_micro_batch(loss_type, tmp_path, caplog):
    model = tiny_gpt2()
    untouched = copy.deepcopy(model)
    forwards = []
    model.transformer.register_forward_hook(lambda *args: forwards.append(torch.is_grad_enabled()))
    optimizer = KOALAPlusPlus(model.parameters())
    recording = RecordingMeasurements(optimizer)
    with caplog.at_level(logging.WARNING, logger="koala_hf.trainer"):
        trainer = KoalaSFTTrainer(model=model, args=config(tmp_path, loss_type=loss_type), processing_class=word_tokenizer(),
                                  train_dataset=Dataset.from_dict({"text": word_texts(8)}), optimizers=(optimizer, None))
        trainer.train()
    assert forwards == [True, True]  # two micro-batches, no extra forward
    (loss, noise), = recording.measured
    expected_loss, expected_noise = by_hand(untouched, trainer, loss_type)
    # TRL's fused head reduces in float32 chunks; a wrong normalisation would be off by percent.
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(noise.double(), expected_noise, rtol=1e-4, atol=0)
    assert not [r for r in caplog.records if "falls back" in r.getMessage()]


def test_a_loss_type_read_as_the_nll_is_measured_as_back_propagated_with_a_notice(tmp_path, caplog):
    """KoalaTrainer first in the MRO but without KoalaSFTTrainer's reading of dft: never silently the NLL."""

    class Combined(KoalaTrainer, trl.SFTTrainer):
        pass

    model = tiny_gpt2()
    optimizer = KOALAPlusPlus(model.parameters())
    recording = RecordingMeasurements(optimizer)
    with caplog.at_level(logging.WARNING, logger="koala_hf.trainer"):
        trainer = Combined(model=model, args=config(tmp_path, loss_type="dft"), processing_class=word_tokenizer(),
                           train_dataset=Dataset.from_dict({"text": word_texts(8)}), optimizers=(optimizer, None))
        trainer.train()
    (loss, noise), = recording.measured
    logged = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    assert loss.item() == pytest.approx(logged, rel=1e-4) and loss.item() < 1.0  # dft's loss, not the NLL (~3.4)
    assert noise.item() == pytest.approx(loss.item() ** 2, rel=1e-4)
    notices = [r.getMessage() for r in caplog.records if "is not the mean of the per-sample losses" in r.getMessage()]
    assert len(notices) == 1 and "KoalaSFTTrainer" in notices[0]


def test_sft_trainer_in_front_of_koala_trainer_is_measured_as_back_propagated_naming_the_order(tmp_path, caplog):
    class Reversed(trl.SFTTrainer, KoalaTrainer):
        pass

    model = tiny_gpt2()
    optimizer = KOALAPlusPlus(model.parameters())
    recording = RecordingMeasurements(optimizer)
    with caplog.at_level(logging.WARNING, logger="koala_hf.trainer"):
        trainer = Reversed(model=model, args=config(tmp_path), processing_class=word_tokenizer(),
                           train_dataset=Dataset.from_dict({"text": word_texts(8)}), optimizers=(optimizer, None))
        trainer.train()
    (loss, _), = recording.measured
    assert loss.item() == pytest.approx(next(e["loss"] for e in trainer.state.log_history if "loss" in e), rel=1e-4)
    assert any("class Reversed(KoalaTrainer, SFTTrainer)" in r.getMessage() for r in caplog.records)


def test_a_plain_sft_trainer_with_a_koala_optimizer_says_what_to_do(tmp_path):
    model = tiny_gpt2()
    trainer = trl.SFTTrainer(model=model, args=config(tmp_path), processing_class=word_tokenizer(),
                             train_dataset=Dataset.from_dict({"text": word_texts(8)}),
                             optimizers=(KOALAPlusPlus(model.parameters()), None))
    with pytest.raises(RuntimeError, match="KoalaTrainer"):
        trainer.train()


def preference_data(n=8):
    texts = word_texts(3 * n, seed=1, shortest=2, longest=5)
    return Dataset.from_dict({"prompt": texts[:n], "chosen": texts[n:2 * n], "rejected": texts[2 * n:]})


def test_dpo_measures_the_back_propagated_loss_exactly_with_a_notice(tmp_path, caplog):
    class KoalaDPOTrainer(KoalaTrainer, trl.DPOTrainer):
        pass

    model = tiny_gpt2()
    optimizer = KOALAPlusPlus(model.parameters(), lr=0.1)
    recording = RecordingMeasurements(optimizer)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_steps=2, report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, max_length=16)
    with caplog.at_level(logging.WARNING, logger="koala_hf.trainer"):
        trainer = KoalaDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=word_tokenizer(),
                                  train_dataset=preference_data(), optimizers=(optimizer, None))
        trainer.train()
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(recording.measured) == 2
    for (loss, noise), expected in zip(recording.measured, logged):
        assert loss.item() == pytest.approx(expected, rel=1e-4)
        assert noise.item() == pytest.approx(expected**2, rel=2e-4)
    assert sum("falls back to loss**2" in r.getMessage() for r in caplog.records) == 1
