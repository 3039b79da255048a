"""The client side of a federation: the same code runs in simulation and in deployments."""

from __future__ import annotations

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

    @property
    def num_train_examples(self) -> int:
        return int(self._x_train.shape[0])

    def fit(self, model: nn.Module, instruction: FitInstruction) -> FitResult:
        """Train from the global parameters and return the processed update."""
        global_params = instruction.parameters
        expected = instruction.plan.base_model
        if expected is not None and frozen_fingerprint(model) != expected:
            raise UserError(
                f"client '{self.name}' has another pretrained base model than the server (its "
                "frozen weights differ), so its adapters would not fit the federation's; install "
                "the same model files (same package version or model_dir) as the server"
            )
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
        context = RoundContext(instruction.run_id, instruction.round, instruction.plan)
        result = self.pipeline.on_client(result, context)
        if self.protocol is not None:
            result = self.protocol.seal(result, context)
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
