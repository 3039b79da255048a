"""What a simulation makes go wrong with clients: dropouts and stragglers.

Both simulated transports (in-process and Ray) ask `SimulatedFaults` before a selected client
trains, so a client fails the same way whichever of them carries the round.

Stragglers are simulated in *simulated time*, not wall-clock time, so that a run is reproducible
and does not depend on how busy the machine is: client i needs
``examples · epochs · seconds_per_example · sᵢ · jᵢ,ᵣ`` seconds in round r, where its speed factor
sᵢ = exp(speed_spread · zᵢ) is drawn once per client (slow devices stay slow) and the jitter
jᵢ,ᵣ = exp(jitter · zᵢ,ᵣ) once per round (zs standard normal, from the run's seed). A client whose
time exceeds the round's deadline is dropped from the round, as a real server drops the results
that arrive after its deadline (`[deployment] round_deadline_s` in a deployment).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from veil.seeding import Purpose, numpy_rng


@dataclass(frozen=True)
class Stragglers:
    """Simulated client speeds and the round deadline."""

    #: Simulated seconds a round waits for results.
    deadline_s: float
    #: Simulated seconds a client of median speed needs per training example and epoch.
    seconds_per_example: float = 0.001
    #: σ of the log of the clients' persistent speed factors (0: all equally fast).
    speed_spread: float = 0.5
    #: σ of the log of a per-round slowdown factor (0: no round-to-round variation).
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not (self.deadline_s > 0 and self.seconds_per_example > 0):
            raise ValueError("deadline_s and seconds_per_example must be > 0")
        if self.speed_spread < 0 or self.jitter < 0:
            raise ValueError("speed_spread and jitter must be >= 0")


class SimulatedFaults:
    """Decides, reproducibly from the seed, whether a selected client fails a round."""

    def __init__(
        self,
        clients: Sequence[str],
        *,
        seed: int,
        dropout: float = 0.0,
        stragglers: Stragglers | None = None,
        examples: Callable[[str], int] | None = None,
    ) -> None:
        """`examples(name)` is a client's number of training examples (needed with
        `stragglers`)."""
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if stragglers is not None and examples is None:
            raise ValueError("simulated stragglers need the clients' numbers of examples")
        self.examples = examples
        self.seed = seed
        self.dropout = dropout
        self.stragglers = stragglers
        self._index = {name: i for i, name in enumerate(clients)}
        self._speeds: dict[int, float] = {}

    def failure(self, name: str, round_: int, *, epochs: int) -> str | None:
        """Why `name` returns nothing in `round_` (None: it answers in time)."""
        index = self._index[name]
        if self.dropout > 0:
            rng = numpy_rng(self.seed, Purpose.DROPOUT, round_, index)
            if rng.random() < self.dropout:
                return "simulated dropout"
        if self.stragglers is not None:
            took = self.simulated_seconds(name, round_, epochs=epochs)
            if took > self.stragglers.deadline_s:
                return (
                    f"straggler: needed {took:.3g} s (simulated), past the deadline of "
                    f"{self.stragglers.deadline_s:g} s"
                )
        return None

    def simulated_seconds(self, name: str, round_: int, *, epochs: int) -> float:
        """The simulated time `name` needs to train in `round_` (needs `stragglers`)."""
        s = self.stragglers
        if s is None or self.examples is None:
            raise ValueError("no straggler model configured")
        index = self._index[name]
        speed = self._speeds.get(index)
        if speed is None:
            z = numpy_rng(self.seed, Purpose.STRAGGLER, index).normal()
            speed = self._speeds[index] = math.exp(s.speed_spread * z)
        jitter = 1.0
        if s.jitter > 0:
            jitter = math.exp(
                s.jitter * numpy_rng(self.seed, Purpose.STRAGGLER, index, round_).normal()
            )
        return self.examples(name) * epochs * s.seconds_per_example * speed * jitter
