"""A coordinator that announces a weaker round than the configuration: every client refuses it.

`SecAggSettings.check_round` is each client's check of the server's round announcement. Each
test plays a server that changes one thing the clients' own configuration decides (the
threshold, the graph degree, the vector length, the modulus, the encoding step) and sends the
announcement, through its wire encoding, to the production `SecAggParticipant`; the participant
must refuse before it releases anything (its set-up answer is its key advertisement). Every test
first shows that the honest announcement of the same settings is accepted, so the refusal comes
from the change alone.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_secagg_protocol import federation

from veil.errors import ConfigError
from veil.federation.messages import ProtocolInstruction
from veil.privacy.secagg import FixedPoint, ProtocolError, RoundParams
from veil.privacy.secagg.layout import UpdateLayout
from veil.privacy.secagg.participant import SecAggParticipant
from veil.privacy.secagg.quantize import CapacityError
from veil.privacy.secagg.roster import StaticRoster
from veil.privacy.secagg.settings import DistributedNoise, SecAggSettings, params_to_bytes
from veil.privacy.secagg.wire import SETUP, Advertised

RUN = "run-1"


def layout_of(settings: SecAggSettings, size: int = 64) -> UpdateLayout:
    return UpdateLayout.of({"w": np.zeros(size, np.float32)}, settings.sum_bounds)


def victim(settings: SecAggSettings, n: int) -> tuple[SecAggParticipant, RoundParams]:
    """The first of `n` clients running `settings`, and the honest plan of a round of all `n`."""
    fed = federation(n)
    layout = layout_of(settings)
    participant = SecAggParticipant(
        fed.names[0],
        fed.identities[fed.names[0]],
        StaticRoster(fed.roster),
        settings,
        layout,
    )
    honest = settings.plan_round(RUN, 1, tuple(fed.names), layout)
    return participant, honest


def announce(participant: SecAggParticipant, params: RoundParams) -> bytes:
    """The server's set-up step, as the client receives it; returns the client's answer."""
    instruction = ProtocolInstruction(RUN, params.round, SETUP, params_to_bytes(params))
    return participant.handle(instruction)


def accepts(settings: SecAggSettings, n: int) -> tuple[SecAggParticipant, RoundParams]:
    """A fresh client, after checking that it accepts the honest plan (and answers it with its
    key advertisement)."""
    participant, honest = victim(settings, n)
    advertised = Advertised.from_bytes(announce(participant, honest))
    assert advertised.advertisement.client == participant.client
    return victim(settings, n)


def test_a_lowered_threshold_is_refused() -> None:
    # The configuration asks for 6 of 7; 5 of 7 still passes the protocol's own two-thirds
    # bound, so only the client's configuration can tell that the server lowered it.
    settings = SecAggSettings(round_size=7, threshold=6)
    participant, honest = accepts(settings, 7)
    assert honest.threshold == 6
    lowered = replace(honest, threshold=5)
    with pytest.raises(ProtocolError, match=r"threshold 5.*configuration says 6"):
        announce(participant, lowered)


@pytest.mark.parametrize(
    ("configured", "announced"),
    [(None, 2), (2, None)],
    ids=["complete graph announced as degree 2", "degree 2 announced as complete graph"],
)
def test_another_graph_degree_is_refused(configured: int | None, announced: int | None) -> None:
    # Four clients, threshold 3 either way: a valid round for both graphs, so the degree is the
    # only difference (a sparser graph gives each client fewer share holders).
    settings = SecAggSettings(round_size=4, neighbours=configured)
    participant, honest = accepts(settings, 4)
    assert honest.threshold == 3
    with pytest.raises(ProtocolError, match=f"degree {announced}"):
        announce(participant, replace(honest, degree=announced))


@pytest.mark.parametrize("delta", [-1, 1])
def test_another_vector_length_is_refused(delta: int) -> None:
    settings = SecAggSettings(round_size=4)
    participant, honest = accepts(settings, 4)
    with pytest.raises(ProtocolError, match=f"vectors of {honest.length + delta} entries"):
        announce(participant, replace(honest, length=honest.length + delta))


def test_another_modulus_is_refused() -> None:
    # A wider ring with the same step cannot overflow: only the modulus check refuses it.
    settings = SecAggSettings(round_size=4)
    participant, honest = accepts(settings, 4)
    wider = FixedPoint(40, honest.fixed_point.step)
    wider.check_capacity(4, settings.capacity_bound())
    with pytest.raises(ProtocolError, match="40-bit modulus"):
        announce(participant, replace(honest, fixed_point=wider))


def test_a_step_that_could_overflow_is_refused() -> None:
    settings = SecAggSettings(round_size=4)
    participant, honest = accepts(settings, 4)
    finer = FixedPoint(32, honest.fixed_point.step / 1e6)
    with pytest.raises(CapacityError):
        announce(participant, replace(honest, fixed_point=finer))


def test_under_distributed_dp_a_finer_step_is_refused() -> None:
    # A finer step than planned leaves less room for the noise: the noisy sum could wrap.
    noise = DistributedNoise(noise_multiplier=1.1, clip_norm=0.5)
    settings = SecAggSettings(round_size=4, distributed_dp=noise)
    participant, honest = accepts(settings, 4)
    finer = FixedPoint(32, honest.fixed_point.step / 100)
    with pytest.raises(ConfigError, match="finer than"):
        announce(participant, replace(honest, fixed_point=finer))
