"""Benchmark: LoRA aggregation rules on non-IID data (issue 24), one `veil run` per rule.

Runs `examples/llm_lora.toml` (the bundled MiniLM, rank-8 LoRA on query and value, the VADER
lexicon split over 4 organisations by a Dirichlet(0.5) partition of the labels, int8 uploads)
once with each `[model.lora] aggregation`: "average" (A and B averaged separately), "ffa"
(FFA-LoRA: A frozen at a shared init, B averaged) and "stack" (FLoRA: the exact mean of the
clients' B·A merged into a dense delta each round). Everything else is the example's; the pooled
baseline is switched off (it does not depend on the rule).

Reports per rule: the held-out test accuracy after each round, the final accuracy and loss, the
bytes each client uploads per round and the bytes sent down per round, and the wall time.

    python benchmarks/lora_aggregation.py [--rounds 5] [--local-epochs 1] [--rules RULE,...]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from veil.config import RunConfig
from veil.run import run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llm_lora.toml"


def rule_config(base: dict[str, Any], rule: str, rounds: int, local_epochs: int) -> RunConfig:
    """The example's config (`base`, its parsed TOML) with `rule` as its LoRA aggregation,
    `rounds` rounds and `local_epochs` local epochs per round (more: more client drift)."""
    raw = copy.deepcopy(base)
    raw["model"]["lora"]["aggregation"] = rule
    raw["federation"]["rounds"] = rounds
    raw["federation"]["local_epochs"] = local_epochs
    raw["federation"]["centralized_baseline"] = False
    return RunConfig.from_dict(raw)


def measure(config: RunConfig) -> dict[str, object]:
    """One run's accuracy per round, final metrics, bytes and time."""
    started = time.perf_counter()
    result = run(config)
    c = result.communication
    rounds = [r for r in result.rounds if r.clients]
    return {
        "aggregation": config.model.lora.aggregation,
        "accuracy_per_round": [round(r.metrics.get("accuracy", float("nan")), 4) for r in rounds],
        "accuracy": round(result.final["accuracy"], 4),
        "loss": round(result.final["loss"], 4),
        "bytes_up_per_client_round": c.bytes_up_per_client_round,
        "bytes_down_per_round": c.bytes_down // max(len(result.rounds), 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rules", default="average,ffa,stack")
    parser.add_argument("--local-epochs", type=int, default=1)
    args = parser.parse_args(argv)
    base = tomllib.loads(EXAMPLE.read_text())
    rows = []
    for rule in args.rules.split(","):
        row = measure(rule_config(base, rule, args.rounds, args.local_epochs))
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    summary = {"rounds": args.rounds, "local_epochs": args.local_epochs, "results": rows}
    print(json.dumps({"benchmark": "lora_aggregation", **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
