"""The client side of a federation: the same code runs in simulation and in deployments."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from veil.data import ClientData
from veil.errors import UserError
from veil.federation.messages import (
    EvaluateInstruction,
    EvaluateResult,
    FitInstruction,
    FitResult,
    ProtocolInstruction,
    ProtocolReply,
)
from veil.federation.objective import CROSS_ENTROPY, Objective
from veil.federation.pipeline import ClientProtocol, ProtocolMismatch, RoundContext, UpdatePipeline
from veil.federation.training import LocalTrainer, SGDTrainer, as_tensors, evaluate
from veil.models import get_parameters, set_parameters
from veil.models.parameters import frozen_fingerprint
from veil.seeding import Purpose, torch_generator


class ClientRunner:
    """One organisation: holds its data, trains locally, runs the client half of the pipeline.

    The model is passed in rather than owned, so that a simulation can run thousands of clients
    through one model instance. `seed` drives the client's own shuffling only. `objective` is
    the run's loss (cross-entropy; squared or Huber for regression): plain SGD minimises it and
    the validation metrics use it (a given `trainer` brings its own).
    """

    def __init__(
        self,
        name: str,
        data: ClientData,
        *,
        n_classes: int,
        pipeline: UpdatePipeline,
        seed: int,
        trainer: LocalTrainer | None = None,
        protocol: ClientProtocol | None = None,
        objective: Objective = CROSS_ENTROPY,
    ) -> None:
        self.name = name
        self.protocol = protocol
        self.objective = objective
        self.trainer: LocalTrainer = trainer or SGDTrainer(objective)
        self.n_classes = n_classes
        self.pipeline = pipeline
        self.seed = seed
        self._x_train, self._y_train = as_tensors(data.x_train, data.y_train)
        self._x_val, self._y_val = as_tensors(data.x_val, data.y_val)
        #: Whether to keep the last round's update and send it again if asked for that round
        #: again (`_repeated`): a deployment member does; a simulation's runners need not.
        self.remember_last = False
        #: The last round trained: (round, digest of its instruction, its processed update).
        self._last: tuple[int, bytes, FitResult] | None = None

    @property
    def num_train_examples(self) -> int:
        return int(self._x_train.shape[0])

    def fit(self, model: nn.Module, instruction: FitInstruction) -> FitResult:
        """Train from the global parameters and return the processed update."""
        expected = instruction.plan.base_model
        if expected is not None and frozen_fingerprint(model) != expected:
            raise UserError(
                f"client '{self.name}' has another pretrained base model than the server (its "
                "frozen weights differ), so its adapters would not fit the federation's; install "
                "the same model files (same package version or model_dir) as the server"
            )
        context = RoundContext(instruction.run_id, instruction.round, instruction.plan)
        result = self._repeated(instruction)
        if result is None:
            result = self._train(model, instruction, context)
        if self.protocol is not None:
            result = self.protocol.seal(result, context)
        return result

    def _repeated(self, instruction: FitInstruction) -> FitResult | None:
        """The update already made for this very instruction, if the coordinator asks again.

        A coordinator that restarts runs the interrupted round again from its checkpoint: the
        member sends the update it made the first time (sealed anew) instead of training again.
        Training again would draw fresh DP noise: a second release of the same round that the
        privacy account does not count. A second instruction for the round with another model or
        plan is refused: no honest coordinator sends one."""
        if not self.remember_last or self._last is None or self._last[0] != instruction.round:
            return None
        if self._last[1] != _digest(instruction):
            raise UserError(
                f"client '{self.name}' already trained round {instruction.round} from another "
                "global model or plan; it refuses to train that round twice (a second release "
                "that the privacy account would not count)"
            )
        return self._last[2]

    def _train(
        self, model: nn.Module, instruction: FitInstruction, context: RoundContext
    ) -> FitResult:
        global_params = instruction.parameters
        set_parameters(model, global_params)
        generator = torch_generator(self.seed, Purpose.LOCAL_TRAINING, instruction.round)
        stats = self.trainer.train(model, self._x_train, self._y_train, instruction.plan, generator)
        local = get_parameters(model)
        update = {name: local[name] - global_params[name] for name in global_params}
        result = FitResult(
            client=self.name,
            round=instruction.round,
            update=update,
            weight=float(self.num_train_examples),
            num_examples=self.num_train_examples,
            metrics={} if stats.loss is None else {"train_loss": stats.loss},
        )
        result = self.pipeline.on_client(result, context)
        if self.remember_last:
            self._last = (instruction.round, _digest(instruction), result)
        return result

    def handle(self, instruction: ProtocolInstruction) -> ProtocolReply:
        """Answer one step of the run's aggregation protocol."""
        if self.protocol is None:
            raise ProtocolMismatch(
                f"client '{self.name}' received a '{instruction.stage}' step, but its config "
                "sums updates in the clear (no secure-aggregation protocol); make its "
                "secure_aggregation match the coordinator's"
            )
        body = self.protocol.handle(instruction)
        return ProtocolReply(self.name, instruction.round, instruction.stage, body)

    def evaluate(self, model: nn.Module, instruction: EvaluateInstruction) -> EvaluateResult:
        """Evaluate the global parameters on the client's own validation split."""
        set_parameters(model, instruction.parameters)
        with torch.no_grad():
            metrics = evaluate(model, self._x_val, self._y_val, self.n_classes, self.objective)
        return EvaluateResult(
            client=self.name,
            round=instruction.round,
            num_examples=int(self._x_val.shape[0]),
            metrics=metrics,
        )


def _digest(instruction: FitInstruction) -> bytes:
    """SHA-256 of a fit instruction's round, plan and global parameters."""
    digest = hashlib.sha256(f"{instruction.round}|{instruction.plan!r}".encode())
    for name in sorted(instruction.parameters):
        array = np.ascontiguousarray(instruction.parameters[name])
        digest.update(f"|{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.digest()
