"""PEFT adapters and encoder-decoder models through KoalaTrainer: per-token losses and the right token count
through a LoRA wrapper; under gradient accumulation, models that ignore num_items_in_batch still train on,
and KOALA still measures, the step's token mean."""

import copy
import logging

import pytest
import torch
from datasets import Dataset
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    TrainingArguments,
)

from koala_hf import KOALAPlusPlus, KoalaSeq2SeqTrainer, KoalaTrainer
from koala_hf.trainer import is_causal_lm
from koala_hf.unwrap import innermost_model
from tests.helpers import RecordingMeasurements, counting_sequences, tiny_gpt2

peft = pytest.importorskip("peft")


def arguments(tmp_path, arguments_class=TrainingArguments, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, report_to=[], use_cpu=True,
                    save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
    return arguments_class(**{**settings, **overrides})


def lora_gpt2():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM")
    return peft.get_peft_model(tiny_gpt2(), config)


def test_a_lora_model_is_seen_through_and_measured_per_predicted_token(tmp_path, caplog):
    model = lora_gpt2()
    assert is_causal_lm(model) and type(innermost_model(model)).__name__ == "GPT2LMHeadModel"
    untouched = copy.deepcopy(model)
    data = counting_sequences(8)  # some rows padded with -100
    optimizer = KOALAPlusPlus([p for p in model.parameters() if p.requires_grad])
    recording = RecordingMeasurements(optimizer)
    with caplog.at_level(logging.WARNING, logger="koala_hf.trainer"):
        trainer = KoalaTrainer(model=model, args=arguments(tmp_path), train_dataset=data, optimizers=(optimizer, None))
        trainer.train()
    assert innermost_model(model).loss_type == "ForCausalLM" and trainer._loss_shifts_labels
    batch = {k: torch.tensor(v) for k, v in data[:8].items()}
    with torch.no_grad():
        logits = untouched(input_ids=batch["input_ids"]).logits.double()[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    terms = nll[labels.reshape(-1) != -100]
    (loss, noise), = recording.measured
    torch.testing.assert_close(loss.double(), terms.mean(), rtol=1e-5, atol=0)  # over predicted tokens only
    torch.testing.assert_close(noise.double(), (terms**2).mean(), rtol=1e-5, atol=0)
    logged = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    assert logged == pytest.approx(terms.mean().item(), rel=1e-4)  # the Trainer divides by the same count
    assert not [r for r in caplog.records if "falls back" in r.getMessage()]


def seq2seq_data(n=16, source=8, target=6, vocab=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(2, vocab, (n, source), generator=generator)
    labels = torch.randint(2, vocab, (n, target), generator=generator)
    lengths = torch.randint(2, target + 1, (n,), generator=generator)
    labels[torch.arange(target) >= lengths[:, None]] = -100  # uneven token counts between micro-batches
    return Dataset.from_dict({"input_ids": inputs.tolist(), "attention_mask": torch.ones_like(inputs).tolist(),
                              "labels": labels.tolist()})


def t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                               dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)).double()


def bart():
    torch.manual_seed(0)
    config = BartConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=16,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return BartForConditionalGeneration(config).double()


@pytest.mark.parametrize("build", [t5, bart], ids=["t5", "bart"])
def test_encoder_decoders_under_accumulation_take_the_step_of_the_whole_batch_and_measure_its_token_mean(build, tmp_path, caplog):
    data = seq2seq_data()
    runs = []
    with caplog.at_level(logging.WARNING, logger="koala_hf.trainer"):
        for batch, accumulation in ((16, 1), (4, 4)):
            model = build()
            untouched = copy.deepcopy(model)
            optimizer = KOALAPlusPlus(model.parameters(), lr=0.5)
            recording = RecordingMeasurements(optimizer)
            args = arguments(tmp_path / str(batch), Seq2SeqTrainingArguments, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=2)
            trainer = KoalaSeq2SeqTrainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
            trainer.train()
            runs.append((torch.cat([p.detach().reshape(-1) for p in model.parameters()]), recording.measured, trainer))
    (whole, whole_measured, _), (accumulated, accumulated_measured, trainer) = runs
    torch.testing.assert_close(accumulated, whole, rtol=1e-10, atol=1e-12)
    for (l1, m1), (l2, m2) in zip(accumulated_measured, whole_measured):
        torch.testing.assert_close((l1, m1), (l2, m2), rtol=1e-12, atol=0)
    # The first step's measurement by hand: every target token of the 16 examples.
    full = {k: torch.tensor(v) for k, v in data[:16].items()}
    with torch.no_grad():
        logits = untouched(**{k: v for k, v in full.items()}).logits
    terms = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), full["labels"].reshape(-1), reduction="none")
    terms = terms[full["labels"].reshape(-1) != -100]
    torch.testing.assert_close(accumulated_measured[0], (terms.mean(), (terms**2).mean()), rtol=1e-10, atol=0)
    notices = [r.getMessage() for r in caplog.records if "ignores num_items_in_batch" in r.getMessage()]
    assert len(notices) == 1 and type(untouched).__name__ in notices[0]  # named, once (the accumulated run only)
    assert not [r for r in caplog.records if "falls back" in r.getMessage()]
