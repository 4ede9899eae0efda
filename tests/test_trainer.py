"""KoalaTrainer: the loss reaches the step in every training setup (E1 through the Trainer)."""

import copy
import logging

import pytest
import torch
import transformers
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.trainer_pt_utils import LabelSmoother

from koala_hf import KOALAM, KOALAPlusPlus, KoalaTrainer, KoalaTrainingArguments, koala_optimizer
from koala_hf.trainer import refuse_sharded_setups
from koala_hf.trainer_measurement import Route
from tests.helpers import RecordingMeasurements, counting_sequences, tiny_gpt2

transformers.logging.set_verbosity_error()


class Recording(KOALAPlusPlus):
    """KOALA++ that keeps every measurement (L_k, m_k) its steps consumed, in ``measured``."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.measured = RecordingMeasurements(self).measured


def arguments(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
    )
    settings.update(overrides)
    return KoalaTrainingArguments(**settings)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------- per family
BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=16)


def token_batch(classes, n=8, length=12):
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, classes, (n, length), generator=generator)
    labels[:, ::4] = -100
    return {"input_ids": torch.randint(0, 40, (n, length), generator=generator).tolist(), "labels": labels.tolist()}


def causal_lm():
    data = counting_sequences(8)
    return tiny_gpt2(), data, True


def masked_lm():
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(**BERT)), Dataset.from_dict(token_batch(40)), False


def token_classification():
    torch.manual_seed(0)
    return BertForTokenClassification(BertConfig(num_labels=5, **BERT)), Dataset.from_dict(token_batch(5)), False


def sequence_classification():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=3, **BERT))
    data = {"input_ids": torch.randint(0, 40, (8, 10)).tolist(), "labels": [0, 1, 2, 0, 1, 2, 2, 1]}
    return model, Dataset.from_dict(data), False


def regression():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=1, **BERT))
    data = {"input_ids": torch.randint(0, 40, (8, 10)).tolist(), "labels": torch.randn(8).tolist()}
    return model, Dataset.from_dict(data), False


def image_classification():
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=4)
    data = {"pixel_values": torch.randn(8, 3, 8, 8).tolist(), "labels": [0, 1, 2, 3, 3, 2, 1, 0]}
    return ViTForImageClassification(config), Dataset.from_dict(data), False


def hand_measurement(model, batch, shift):
    """(L, m) computed term by term from the untrained model's logits."""
    model.eval()
    with torch.no_grad():
        inputs = {k: torch.tensor(v) for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.double()
    labels = torch.tensor(batch["labels"])
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if labels.is_floating_point():
        terms = (logits.squeeze(-1) - labels.double()) ** 2
    else:
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        terms = torch.stack([-torch.log_softmax(row, -1)[y] for row, y in zip(flat_logits, flat_labels) if y != -100])
    return terms.mean(), (terms**2).mean()


@pytest.mark.parametrize(
    "family",
    [causal_lm, masked_lm, token_classification, sequence_classification, regression, image_classification],
)
def test_the_measurement_fed_to_the_optimizer_equals_a_hand_computation(family, tmp_path):
    model, data, shift = family()
    expected_loss, expected_noise = hand_measurement(copy.deepcopy(model), data[:8], shift)
    optimizer = Recording(model.parameters())
    KoalaTrainer(model=model, args=arguments(tmp_path), train_dataset=data, optimizers=(optimizer, None)).train()
    (loss, noise), = optimizer.measured
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(noise.double(), expected_noise, rtol=1e-5, atol=1e-6)


def test_label_smoothing_is_the_loss_measured(tmp_path):
    model = tiny_gpt2()
    data = counting_sequences(8)
    batch = {k: torch.tensor(v) for k, v in data[:8].items()}
    with torch.no_grad():
        expected = LabelSmoother(epsilon=0.2)(copy.deepcopy(model)(input_ids=batch["input_ids"]), batch["labels"], shift_labels=True)
    optimizer = Recording(model.parameters())
    args = arguments(tmp_path, label_smoothing_factor=0.2)
    KoalaTrainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
    torch.testing.assert_close(optimizer.measured[0][0], expected, rtol=1e-5, atol=1e-6)


class DoubledLossTrainer(KoalaTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (2 * outputs.loss, outputs) if return_outputs else 2 * outputs.loss


def test_a_custom_compute_loss_is_the_loss_measured_with_the_squared_loss_as_noise(tmp_path, caplog):
    model = tiny_gpt2()
    data = counting_sequences(8)
    batch = {k: torch.tensor(v) for k, v in data[:8].items()}
    with torch.no_grad():
        expected = 2 * copy.deepcopy(model)(**batch).loss
    optimizer = Recording(model.parameters())
    DoubledLossTrainer(model=model, args=arguments(tmp_path), train_dataset=data, optimizers=(optimizer, None)).train()
    (loss, noise), = optimizer.measured
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(noise, expected**2, rtol=1e-5, atol=1e-6)
    notices = [r for r in caplog.records if "falls back to loss**2" in r.getMessage()]
    assert len(notices) == 1


def test_a_compute_loss_func_is_the_loss_measured(tmp_path):
    model = tiny_gpt2()
    data = counting_sequences(8, pad_some=False)

    def half_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].reshape(-1, 32)
        return 0.5 * torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum") / num_items_in_batch

    optimizer = Recording(model.parameters())
    trainer = KoalaTrainer(model=model, args=arguments(tmp_path), train_dataset=data, optimizers=(optimizer, None),
                           compute_loss_func=half_loss)
    trainer.train()
    # What the Trainer back-propagated (normalised by its own token count) is what KOALA measured.
    optimised = trainer.state.log_history[0]["loss"]
    (loss, noise), = optimizer.measured
    assert loss.item() == pytest.approx(optimised, rel=1e-4)  # transformers < 4.48 logs losses to 4 decimals
    assert noise.item() == pytest.approx(optimised**2, rel=2e-4)


# ------------------------------------------------------ training setups
def test_gradient_accumulation_4_x_8_follows_batch_32(tmp_path):
    data = counting_sequences(96)
    runs = []
    for batch, accumulation in ((32, 1), (8, 4)):
        model = tiny_gpt2(torch.float64)
        optimizer = Recording(model.parameters(), lr=0.5)
        args = arguments(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=3)
        KoalaTrainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
        runs.append((flat(model), optimizer.measured))
    (large, large_measured), (accumulated, accumulated_measured) = runs
    assert not torch.equal(large, flat(tiny_gpt2(torch.float64)))
    torch.testing.assert_close(accumulated, large, rtol=1e-10, atol=1e-12)
    for (l1, m1), (l2, m2) in zip(accumulated_measured, large_measured):
        torch.testing.assert_close((l1, m1), (l2, m2), rtol=1e-12, atol=0)


@pytest.mark.parametrize("variant, noise", [("koala++", None), ("koala-m", None), ("koala++", "none"), ("koala-v", "variance")])
def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(variant, noise, tmp_path):
    data = counting_sequences(64)
    settings = dict(per_device_train_batch_size=8, max_steps=6, save_strategy="steps", save_steps=3,
                    koala_optimizer=variant, lr_scheduler_type="linear", eval_strategy="steps", eval_steps=3)
    whole = tiny_gpt2()
    first = KoalaTrainer(model=whole, args=arguments(tmp_path / "a", koala_noise=noise, **settings), train_dataset=data,
                         eval_dataset=data.select(range(8)))
    first.train()

    # Resumed with the default arguments: the checkpoint's noise mode is the one that continues (E1a-E1c).
    resumed = tiny_gpt2(seed=99)
    trainer = KoalaTrainer(model=resumed, args=arguments(tmp_path / "b", **settings), train_dataset=data, eval_dataset=data.select(range(8)))
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert torch.equal(flat(resumed), flat(whole))
    assert {g["noise"] for g in koala_optimizer(trainer.optimizer).param_groups} == {noise or "second_moment"}


class InfGradientAt(TrainerCallback):
    """Makes one step's gradients overflow, as fp16 does, and snapshots the optimizer around it."""

    def __init__(self, step, model):
        self.step, self.armed, self.snapshots = step, False, {}
        next(model.parameters()).register_hook(lambda g: g * float("inf") if self.armed else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step == self.step

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.armed:
            self.snapshots["before"] = copy.deepcopy(koala_optimizer(optimizer).state_dict())

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.armed:
            self.snapshots["after"] = copy.deepcopy(koala_optimizer(optimizer).state_dict())


def test_a_step_the_grad_scaler_skips_leaves_the_state_and_does_not_leak_its_loss(tmp_path):
    # A classifier: the Trainer's logged step loss is exactly the per-example mean KOALA measures.
    model, _, _ = sequence_classification()
    data = Dataset.from_dict({"input_ids": torch.randint(0, 40, (64, 10)).tolist(), "labels": (torch.arange(64) % 3).tolist()})
    optimizer = Recording(model.parameters())
    watcher = InfGradientAt(step=2, model=model)
    trainer = KoalaTrainer(model=model, args=arguments(tmp_path, max_steps=5), train_dataset=data,
                           optimizers=(optimizer, None), callbacks=[watcher])
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # what fp16 brings on a GPU
    trainer.train()

    assert trainer.scaler_skipped_steps == 1 and len(optimizer.measured) == 4
    before, after = watcher.snapshots["before"]["state"], watcher.snapshots["after"]["state"]
    for key in before:
        for name, value in before[key].items():
            pairs = [(value, after[key][name])] if name != "koala" else [(v, after[key][name][k]) for k, v in value.items()]
            for was, now in pairs:  # "koala": the filter-wide state, in the first parameter's state
                assert torch.equal(torch.as_tensor(was), torch.as_tensor(now)), (key, name)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    taken = [logged[i] for i in (0, 1, 3, 4)]  # the third step (index 2) was skipped
    assert [pytest.approx(loss.item(), rel=1e-4) for loss, _ in optimizer.measured] == taken  # logged to 4 decimals


def test_a_plain_trainer_points_to_koala_trainer(tmp_path):
    model = tiny_gpt2()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=counting_sequences(8), optimizers=(KOALAPlusPlus(model.parameters()), None))
    with pytest.raises(RuntimeError, match="KoalaTrainer"):
        trainer.train()


def test_koala_signals_reach_the_logs_with_the_values_of_the_filters_state(tmp_path):
    trainer = KoalaTrainer(model=tiny_gpt2(), args=arguments(tmp_path, max_steps=4, logging_steps=2, lr_scheduler_type="constant"),
                           train_dataset=counting_sequences(64))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for key in ("koala/R", "koala/innovation_variance", "koala/effective_step", "koala/skipped_steps", "koala/scaler_skipped_steps"):
        assert all(key in entry for entry in logs), key
    # The last log came after the last step: its signals are those of the state the run ended with.
    optimizer = koala_optimizer(trainer.optimizer)
    state = optimizer.state["koala"]
    s = torch.stack([optimizer.state[p]["filter"][0] for g in optimizer.param_groups for p in g["params"]])
    lr = torch.tensor([g["lr"] for g in optimizer.param_groups for p in g["params"]], dtype=s.dtype)
    last = logs[-1]
    assert last["koala/R"] == pytest.approx(state["R"].mean().item(), rel=1e-6)
    assert last["koala/measured_loss"] == pytest.approx(state["loss"].item(), rel=1e-6)
    assert last["koala/innovation_variance"] == pytest.approx(s.mean().item(), rel=1e-6)  # E15, every layer stepped
    assert last["koala/effective_step"] == pytest.approx((lr * state["loss"] / s).mean().item(), rel=1e-6)  # E16
    assert last["koala/skipped_steps"] == 0 and last["koala/R"] != 1.0


def test_under_the_default_linear_decay_the_logged_effective_step_is_that_of_the_lr_each_step_applied(tmp_path):
    """Logged after the scheduler has stepped, the signal still uses the step's own lr: lr0 (1 - k/N) at step k
    (E4, E16), so the last step of a linear schedule reports its real step, not 0."""
    steps, lr0 = 4, 1.0
    trainer = KoalaTrainer(model=tiny_gpt2(), args=arguments(tmp_path, max_steps=steps, logging_steps=1, learning_rate=lr0,
                                                             lr_scheduler_type="linear"),
                           train_dataset=counting_sequences(64))
    trainer.train()
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    optimizer = koala_optimizer(trainer.optimizer)
    assert optimizer.param_groups[0]["lr"] == 0.0
    s = torch.stack([optimizer.state[p]["filter"][0] for g in optimizer.param_groups for p in g["params"]])
    applied = lr0 * (1 - (steps - 1) / steps)
    expected = (applied * optimizer.state["koala"]["loss"] / s).mean().item()
    assert last["koala/effective_step"] == pytest.approx(expected, rel=1e-6) and expected > 0


def advice_run(tmp_path, lr, noise):
    """300 steps of KoalaTrainer on the tiny GPT, logged every 25 steps; returns the trainer and the advice."""
    args = arguments(tmp_path, max_steps=300, logging_steps=25, learning_rate=lr, lr_scheduler_type="constant",
                     koala_kwargs={"noise": noise})
    trainer = KoalaTrainer(model=tiny_gpt2(), args=args, train_dataset=counting_sequences(512))
    with pytest.MonkeyPatch.context() as patch:
        said = []
        patch.setattr(logging.getLogger("koala_hf"), "warning", lambda message, *a, **k: said.append(message))
        trainer.train()
    return trainer, [message for message in said if "koala/" in message]


def test_the_papers_lm_lr_with_e1a_noise_gets_advice_in_the_log_with_the_sgd_step_it_takes(tmp_path):
    """lr 1e-3 with E1a on a loss near 3.4: R ~ L^2 is all of S, and each step is an SGD step of lr L/R (sigma+q)
    (E15, E16; the spec's note on the papers' LM setting). Said once, with that figure from the state."""
    trainer, advice = advice_run(tmp_path, 1e-3, "second_moment")
    assert len(advice) == 1 and "noise='none'" in advice[0], advice
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["koala/noise_share"] > 0.99 for entry in logs)
    said_at = next(entry for entry in logs if entry["step"] == 25 + 200)  # a full window after the first reading
    sgd_step = 1e-3 * said_at["koala/measured_loss"] / said_at["koala/R"] * (0.1 + 0.1)  # one group: R is its own
    assert f"= {sgd_step:.3g}" in advice[0]


def test_a_healthy_run_gets_no_advice(tmp_path):
    """E1c at lr 1e-2: R fades, the loss falls from 3.4 to near 0, and nothing is said."""
    trainer, advice = advice_run(tmp_path, 1e-2, "none")
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1]["loss"] < 0.1 * logs[0]["loss"] and logs[-1]["koala/noise_share"] < 0.01
    assert advice == []


def test_under_bf16_autocast_the_measurement_is_the_float32_cross_entropy_of_the_bf16_logits(tmp_path):
    model = tiny_gpt2()
    optimizer = Recording(model.parameters())
    seen = []
    model.register_forward_hook(lambda module, args, kwargs, out: seen.append((kwargs["input_ids"], kwargs["labels"], out.logits.detach()))
                                if torch.is_grad_enabled() else None, with_kwargs=True)
    trainer = KoalaTrainer(model=model, args=arguments(tmp_path, bf16=True, max_steps=30, logging_steps=10),
                           train_dataset=counting_sequences(128), optimizers=(optimizer, None))
    trainer.train()
    for (loss, noise), (_, labels, logits) in zip(optimizer.measured[:3], seen[:3]):
        flat_logits, targets = logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        terms = torch.nn.functional.cross_entropy(flat_logits, targets, reduction="none")[targets != -100]
        torch.testing.assert_close(loss, terms.mean(), rtol=1e-6, atol=0)
        torch.testing.assert_close(noise, (terms**2).mean(), rtol=1e-6, atol=0)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert koala_optimizer(trainer.optimizer).state["koala"]["skipped_steps"].item() == 0


def test_koala_m_evaluates_and_saves_the_posterior_weights(tmp_path):
    model = tiny_gpt2()
    modes = []

    class WatchModes(TrainerCallback):
        def on_evaluate(self, args, state, control, optimizer=None, **kwargs):
            modes.append(koala_optimizer(optimizer).state["koala"]["training"])

    trainer = KoalaTrainer(model=model, args=arguments(tmp_path, koala_optimizer="koala-m", max_steps=4, eval_strategy="steps", eval_steps=2),
                           train_dataset=counting_sequences(64), eval_dataset=counting_sequences(8), callbacks=[WatchModes()])
    trainer.train()
    assert modes == [False, False]  # evaluated in eval mode, at steps 2 and 4
    optimizer = koala_optimizer(trainer.optimizer)
    optimizer.train()
    predicted = flat(model).clone()
    # After the trailing predict theta = posterior + u_post and u = a u_post (E31): the posterior is theta - u / a.
    a = optimizer.param_groups[0]["a"]
    posterior = torch.cat([(p.detach() - optimizer.state[p]["u"] / a).reshape(-1) for p in model.parameters()])
    trainer.save_model(str(tmp_path / "final"))
    saved = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    torch.testing.assert_close(flat(saved), posterior, rtol=1e-6, atol=1e-7)
    assert not torch.equal(flat(saved), predicted)
    optimizer.eval()
    torch.testing.assert_close(flat(model), posterior, rtol=1e-6, atol=1e-7)
    optimizer.train()  # back to the predicted weights the next forward pass needs
    torch.testing.assert_close(flat(model), predicted, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------- arguments and setups
@pytest.mark.parametrize("variant, lr", [("koala++", 1.0), ("koala++ns", 1.0), ("koala-v", 0.1), ("koala-m", 1.0)])
def test_an_unset_learning_rate_is_the_variants_default(variant, lr, tmp_path):
    trainer = KoalaTrainer(model=tiny_gpt2(), args=arguments(tmp_path, koala_optimizer=variant), train_dataset=counting_sequences(8))
    trainer.create_optimizer()
    assert {group["lr"] for group in trainer.optimizer.param_groups} == {lr}


def test_arguments_reach_the_optimizer(tmp_path):
    args = arguments(tmp_path, koala_optimizer="koala-m", learning_rate=0.3, weight_decay=1e-4, koala_r=0.5,
                     koala_kwargs='{"a": 0.8, "sw": 0.2}')
    trainer = KoalaTrainer(model=tiny_gpt2(), args=args, train_dataset=counting_sequences(8))
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, KOALAM)
    assert {(g["lr"], g["a"], g["sw"], g["r"]) for g in optimizer.param_groups} == {(0.3, 0.8, 0.2, 0.5)}
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 1e-4]


def test_arguments_a_variant_does_not_take_are_refused(tmp_path):
    with pytest.raises(ValueError, match="koala-m does not take sigma"):
        arguments(tmp_path, koala_optimizer="koala-m", koala_sigma=0.1)
    with pytest.raises(ValueError, match="Unknown KOALA optimizer"):
        arguments(tmp_path, koala_optimizer="adamw")


def test_replacing_trainer_by_koala_trainer_alone_trains_koala_plus_plus_at_its_own_lr(tmp_path, caplog):
    """The one-word swap: the Trainer's own arguments, no optimizer."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2, disable_tqdm=True)
    with caplog.at_level("WARNING", logger="koala_hf.trainer"):
        trainer = KoalaTrainer(model=tiny_gpt2(), args=args, train_dataset=counting_sequences(16))
        trainer.train()
    optimizer = koala_optimizer(trainer.optimizer)
    assert isinstance(optimizer, KOALAPlusPlus) and optimizer.state["koala"]["step"].item() == 2
    assert {group["initial_lr"] for group in optimizer.param_groups} == {1.0}  # the Trainer's 5e-5 is AdamW's
    built = [r.getMessage() for r in caplog.records if "training with KOALAPlusPlus" in r.getMessage()]
    assert len(built) == 1 and "lr=1.0" in built[0]
    given = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=0.3)
    trainer = KoalaTrainer(model=tiny_gpt2(), args=given, train_dataset=counting_sequences(8))
    assert {group["lr"] for group in trainer.create_optimizer().param_groups} == {0.3}


@pytest.mark.parametrize("arguments_class", [TrainingArguments, KoalaTrainingArguments])
def test_an_optim_set_away_from_its_default_is_a_baseline_trained_untouched(arguments_class, tmp_path, caplog):
    args = arguments_class(output_dir=str(tmp_path), report_to=[], use_cpu=True, optim="adafactor", max_steps=1,
                           disable_tqdm=True)
    with caplog.at_level("WARNING", logger="koala_hf.trainer"):
        trainer = KoalaTrainer(model=tiny_gpt2(), args=args, train_dataset=counting_sequences(8))
        trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "Adafactor" and koala_optimizer(trainer.optimizer) is None
    assert args.learning_rate == 5e-5  # the Trainer's default, not KOALA++'s
    assert any("optim='adafactor' is the Trainer's optimizer" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="choose one"):
        KoalaTrainingArguments(output_dir=str(tmp_path), optim="adafactor", koala_optimizer="koala-m")


def test_other_optimizers_train_untouched_for_baselines(tmp_path):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = KoalaTrainer(model=model, args=arguments(tmp_path, max_steps=3), train_dataset=counting_sequences(32), optimizers=(optimizer, None))
    trainer.train()
    assert trainer.state.global_step == 3


@pytest.mark.parametrize("setup", ["fsdp", "deepspeed"])
def test_sharding_setups_are_refused_at_start(setup):
    with pytest.raises(ValueError, match="Use FSDP2"):
        refuse_sharded_setups(**{"fsdp": False, "deepspeed": False, setup: True})


def test_replicated_dtensor_parameters_are_refused_by_the_optimizer_saying_what_is_supported(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.tensor import distribute_tensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        replicated = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 4), mesh))  # Replicate(): not FSDP2's
        with pytest.raises(ValueError, match="Supported: .*FSDP2"):
            KOALAPlusPlus([replicated])
    finally:
        dist.destroy_process_group()


def test_a_single_process_trainer_does_not_reduce_the_measurement(tmp_path):
    """Only processes whose gradients DDP averages may share a measurement."""
    trainer = KoalaTrainer(model=tiny_gpt2(), args=arguments(tmp_path), train_dataset=counting_sequences(8))
    trainer.train()
    assert koala_optimizer(trainer.optimizer).measurement.process_group is False


class CustomLossModel(torch.nn.Module):
    """A model returning ``{"loss", "logits"}`` whose loss is not the plain loss of its logits."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.net = torch.nn.Linear(6, 3 if kind == "weighted_ce" else 1)

    def forward(self, x, labels=None):
        logits = self.net(x)
        if labels is None:
            return {"logits": logits}
        if self.kind == "l1":
            loss = (logits.squeeze(-1) - labels).abs().mean()
        else:
            weights = torch.tensor([1.0, 3.0, 0.2])
            loss = torch.nn.functional.cross_entropy(logits, labels, weight=weights)
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("kind", ["l1", "weighted_ce"])
def test_a_custom_models_loss_is_measured_not_a_rederived_one(kind, tmp_path, caplog):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=generator)
    labels = torch.randn(16, generator=generator) * 5 if kind == "l1" else torch.randint(0, 3, (16,), generator=generator)
    data = Dataset.from_dict({"x": x.tolist(), "labels": labels.tolist()})
    model = CustomLossModel(kind)
    optimizer = Recording(model.parameters(), lr=0.1)
    with caplog.at_level("WARNING", logger="koala_hf.trainer"):
        trainer = KoalaTrainer(model=model, args=arguments(tmp_path, per_device_train_batch_size=16, max_steps=2),
                               train_dataset=data, optimizers=(optimizer, None))
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(optimizer.measured) == 2
    for (measured, noise), optimised in zip(optimizer.measured, losses):
        assert measured.item() == pytest.approx(optimised, rel=1e-4)  # what was back-propagated (logged to 4 decimals)
        assert noise.item() == pytest.approx(optimised**2, rel=2e-4)
    notices = [record.message for record in caplog.records if "is not the mean of the per-sample losses" in record.message]
    assert len(notices) == 1 and "falls back to loss**2" in notices[0]


def test_a_model_whose_loss_matches_keeps_its_per_sample_losses(tmp_path):
    data = counting_sequences(16)
    model = tiny_gpt2()
    optimizer = Recording(model.parameters())
    trainer = KoalaTrainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=data, optimizers=(optimizer, None))
    trainer.train()
    assert trainer.measurement.route is Route.PER_SAMPLE  # checked on the first micro-batch, and kept
    (loss, noise), _ = optimizer.measured
    assert noise.item() > loss.item() ** 2  # mean(l_i^2) > L^2: measured from the per-token losses
