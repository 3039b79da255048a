"""The federation core: messages, the update pipeline, strategies, the client runner, the server."""

from veil.federation.client import ClientRunner
from veil.federation.fedavg import FedAvg, FedProx
from veil.federation.fedopt import FedOpt
from veil.federation.messages import (
    ClientFailure,
    EvaluateInstruction,
    EvaluateResult,
    FitInstruction,
    FitResult,
    TrainingPlan,
)
from veil.federation.pipeline import (
    Aggregate,
    Aggregator,
    ClientStage,
    RoundContext,
    ServerStage,
    UpdatePipeline,
    UpdateRejected,
    WeightedSum,
)
from veil.federation.server import ClientGateway, FederatedServer, RoundRecord, ServerObserver
from veil.federation.strategy import Strategy

__all__ = [
    "Aggregate",
    "Aggregator",
    "ClientFailure",
    "ClientGateway",
    "ClientRunner",
    "ClientStage",
    "EvaluateInstruction",
    "EvaluateResult",
    "FedAvg",
    "FedOpt",
    "FedProx",
    "FederatedServer",
    "FitInstruction",
    "FitResult",
    "RoundContext",
    "RoundRecord",
    "ServerObserver",
    "ServerStage",
    "Strategy",
    "TrainingPlan",
    "UpdatePipeline",
    "UpdateRejected",
    "WeightedSum",
]
