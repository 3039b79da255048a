"""Devices (`veil.devices`): the trainer, DP-SGD (noise, norm buffers, batches), evaluation and
the parameter round trip run with a causal LM on a fake device (`fake_device`: tensors that say
`meta` and hold CPU data), and no tensor that meets the model is silently created elsewhere;
compression and SecAgg's encoding make no torch tensor at all (they work on the host arrays of
an update that left the device once).

Model: a tiny GPT-2 initialised locally (`tiny_gpt2_config`); data: a SYNTHETIC token stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from extras import require
from fake_device import FAKE_DEVICE, FakeDeviceMode, OnDevice
from veil.devices import frozen_base_dtype, model_device, place_model, resolve_device
from veil.errors import UserError
from veil.federation.compression import Int8Compressor
from veil.federation.messages import TrainingPlan
from veil.federation.objective import IGNORE_INDEX, TOKEN_CROSS_ENTROPY
from veil.federation.training import evaluate_tokens, train_epochs
from veil.models import get_parameters, set_parameters
from veil.models.transformer import CausalLM, LoRASettings, build_causal_lm, tiny_gpt2_config
from veil.privacy.dp.dpsgd import DPSGDTrainer, NoiseBlocks
from veil.privacy.dp.randomness import SeededRandom
from veil.privacy.secagg.quantize import FixedPoint

require("peft")

VOCAB = 32


@pytest.fixture
def lm() -> CausalLM:
    lora = LoRASettings(rank=2, target_modules=("c_attn", "c_fc"))
    return build_causal_lm(
        config=tiny_gpt2_config(vocab_size=VOCAB, n_positions=16), lora=lora, seed=0
    )


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = (torch.randint(0, VOCAB, (24, 1), generator=generator) + torch.arange(9)) % VOCAB
    x, y = tokens[:, :-1].float(), tokens[:, 1:].clone()
    y[:, :3] = IGNORE_INDEX  # a "prompt" whose tokens the loss skips
    return x, y


@pytest.fixture
def mode() -> Iterator[FakeDeviceMode]:
    with FakeDeviceMode() as active:
        yield active


def _all_on_device(model: torch.nn.Module) -> bool:
    return all(isinstance(p, OnDevice) for p in model.parameters())


def test_training_dp_sgd_and_evaluation_stay_on_the_device(
    lm: CausalLM, data: tuple[torch.Tensor, torch.Tensor], mode: FakeDeviceMode
) -> None:
    x, y = data
    before = get_parameters(lm)
    lm.to(FAKE_DEVICE)
    assert model_device(lm) == FAKE_DEVICE and _all_on_device(lm)
    uploads = len(mode.uploads)
    plan = TrainingPlan(epochs=1, batch_size=8, learning_rate=0.1, momentum=0.9, proximal_mu=0.1)
    loss = train_epochs(lm, x, y, plan, torch.Generator().manual_seed(0), TOKEN_CROSS_ENTROPY)
    assert np.isfinite(loss)
    trainer = DPSGDTrainer(
        noise_multiplier=1.0,
        clip_norm=1.0,
        source=SeededRandom(0),
        production=False,
        loss=TOKEN_CROSS_ENTROPY.per_example,
    )
    assert trainer.train(lm, x, y, plan, torch.Generator()).steps == 3
    assert trainer._clippers[id(lm)].method == "layer-rules"
    metrics = evaluate_tokens(lm, x, y)
    assert set(metrics) == {"loss", "perplexity", "token_accuracy"}
    # Batches and noise blocks were copied to the device explicitly; nothing mixed.
    assert len(mode.uploads) > uploads
    assert mode.violations == []
    assert _all_on_device(lm)
    after = get_parameters(lm)  # one explicit copy back to the host
    assert all(not np.array_equal(before[n], after[n]) for n in before if "lora_B" in n)
    set_parameters(lm, after)
    assert _all_on_device(lm) and mode.violations == []


def test_noise_is_drawn_on_the_host_and_moved(lm: CausalLM, mode: FakeDeviceMode) -> None:
    lm.to(FAKE_DEVICE)
    params = [p.detach() for p in lm.parameters() if p.requires_grad]
    blocks = NoiseBlocks(SeededRandom(0), params, steps=3, scale=0.5)
    noise = blocks.next()
    assert all(isinstance(t, OnDevice) for t in noise)
    assert [t.shape for t in noise] == [p.shape for p in params]
    torch._foreach_add_(params, noise)
    assert mode.violations == []


def test_the_checker_catches_a_host_buffer(lm: CausalLM, mode: FakeDeviceMode) -> None:
    # The negative control: a buffer made without device= (what NoiseBlocks did before devices)
    # meeting the parameters is recorded.
    lm.to(FAKE_DEVICE)
    params = [p.detach() for p in lm.parameters() if p.requires_grad]
    torch._foreach_add_(params, [torch.zeros(p.shape) for p in params])
    assert mode.violations and "meet fake-device tensors" in mode.violations[0]


def test_compression_and_secagg_encoding_make_no_tensor(lm: CausalLM, mode: FakeDeviceMode) -> None:
    lm.to(FAKE_DEVICE)
    update = get_parameters(lm)
    made = len(mode.uploads)
    ops_before = mode.operations
    payload = Int8Compressor().compress(update, SeededRandom(0))
    fixed = FixedPoint(16, 1e-3)
    encoded = [fixed.encode(values, 1.0, SeededRandom(1)) for values in update.values()]
    assert payload and len(encoded) == len(update)
    assert mode.operations == ops_before and len(mode.uploads) == made
    assert mode.violations == []


def test_device_names_and_the_frozen_base_dtype() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert frozen_base_dtype(torch.device("cpu")) == torch.float32


def test_place_model_keeps_the_base_and_adapters_in_float32_on_the_cpu(lm: CausalLM) -> None:
    placed = place_model(lm, torch.device("cpu"))
    assert placed is lm
    assert {p.dtype for p in lm.parameters()} == {torch.float32}


def test_gradient_checkpointing_keeps_dp_sgd_per_sample_gradients(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    from veil.privacy.dp.per_sample import PerSampleClipper

    lora = LoRASettings(rank=2, target_modules=("c_attn", "c_fc"))
    config = tiny_gpt2_config(vocab_size=VOCAB, n_positions=16)
    plain = build_causal_lm(config=config, lora=lora, seed=0)
    checkpointed = build_causal_lm(config=config, lora=lora, gradient_checkpointing=True, seed=0)
    checkpointed.load_state_dict(plain.state_dict())
    generator = torch.Generator().manual_seed(3)
    for model in (plain, checkpointed):
        model.train()  # checkpointing acts in training mode only; dropout off to compare
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        with torch.no_grad():  # peft starts B at zero; give it values so A's gradients count
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=generator.manual_seed(3)))
    x, y = data
    loss = TOKEN_CROSS_ENTROPY.per_example
    a = PerSampleClipper(plain, loss).clipped_sum(x[:4], y[:4], clip_norm=0.5)
    b = PerSampleClipper(checkpointed, loss).clipped_sum(x[:4], y[:4], clip_norm=0.5)
    for name, g in a.grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(b.grads[name], g, atol=1e-6, rtol=1e-4)


def test_a_device_other_than_the_cpu_is_for_simulations() -> None:
    from veil.config import RunConfig
    from veil.errors import ConfigError

    raw = {
        "name": "t",
        "mode": "ray",
        "data": {"dataset": "breast_cancer"},
        "federation": {"clients": 2, "rounds": 1, "device": "auto"},
    }
    with pytest.raises(ConfigError, match="mode = 'simulation'"):
        RunConfig.from_dict(raw)
    raw["mode"] = "simulation"
    assert RunConfig.from_dict(raw).federation.device == "auto"
