"""Routes: which model answers a request whose `model` names a route of the model registry.

A route's decision is a plan for the orchestrator, made before anything is sent to a stage:

- `tiers` picks one target by the request's complexity score (`llmmesh.gateway.complexity`);
- `split` picks one arm by weight, sticky per caller: a hash of the caller's identity and the route's
  name places the caller in [0, 1), the same caller always in the same arm;
- `fallback` becomes a `Fallback` plan: its targets in order, the next one tried when one is unavailable,
  overloaded, not loaded or silent past the route's first-token timeout, before anything reached the client;
- `cascade` becomes a `Cascade` plan: the first model runs with log-probabilities on; the orchestrator holds
  its first `check_tokens` tokens and escalates to the rest of the cascade when their mean is below
  `min_mean_logprob`, before any text reaches the client (the client never receives two answers).

Routes nest (a split whose arms are fallbacks): tiers and split decide at once and say why; a plan's
`why` holds those reasons, outermost first, for `Final.route`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from llmmesh.common.errors import InvalidArgument
from llmmesh.common.registry import ModelEntry, ModelRegistry, RouteEntry, UnknownModel
from llmmesh.gateway.complexity import score_request
from llmmesh.v1 import generation_pb2

__all__ = ["Cascade", "Fallback", "Pick", "Plan", "Router", "arm_position"]

# The complexity of a request, in [0, 1].
Scorer = Callable[[generation_pb2.GenerateRequest], float]


@dataclass(frozen=True)
class Pick:
    """Run this model."""

    model: ModelEntry
    why: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fallback:
    """Run the options in order until one answers."""

    route: RouteEntry
    options: tuple[Plan, ...]
    why: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cascade:
    """Run `first`; when its first tokens are not confident enough, run `rest` instead."""

    route: RouteEntry
    first: ModelEntry
    rest: Plan
    why: tuple[str, ...] = ()


Plan = Pick | Fallback | Cascade


def arm_position(caller: str, route: str) -> float:
    """Where a caller falls in [0, 1) for a split route: the same for every request of that caller."""
    return xxhash.xxh3_64_intdigest(f"{route}\0{caller}".encode()) / 2**64


def _default_scorer(request: generation_pb2.GenerateRequest) -> float:
    """The complexity score, the last user turn weighted most."""
    return score_request(request).value


class Router:
    def __init__(self, registry: ModelRegistry, scorer: Scorer | None = None) -> None:
        self._registry = registry
        self._scorer = scorer or _default_scorer

    @property
    def registry(self) -> ModelRegistry:
        return self._registry

    def plan(self, request: generation_pb2.GenerateRequest, caller: str) -> tuple[str, Plan]:
        """(the route the request named, "" for a model; the plan). An unknown name is INVALID_ARGUMENT
        naming it and listing every model and route."""
        try:
            target = self._registry.lookup(request.model)
        except UnknownModel as exc:
            raise InvalidArgument("model", str(exc)) from None
        if isinstance(target, ModelEntry):
            return "", Pick(target)
        return target.name, self._plan(target.name, request, caller, ())

    def _plan(self, name: str, request: generation_pb2.GenerateRequest, caller: str, why: tuple[str, ...]) -> Plan:
        target = self._registry.lookup(name)
        if isinstance(target, ModelEntry):
            return Pick(target, why)
        route = target
        if route.kind == "tiers":
            value = self._scorer(request)
            index = next((i for i, bound in enumerate(route.bounds) if value < bound), len(route.bounds))
            choice = route.targets[index]
            return self._plan(choice, request, caller, (*why, f"{route.name}: tiers: {choice} (score {value:.2f})"))
        if route.kind == "split":
            position = arm_position(caller, route.name) * sum(route.weights)
            index, edge = 0, route.weights[0]
            while position >= edge and index < len(route.weights) - 1:
                index += 1
                edge += route.weights[index]
            choice = route.targets[index]
            arm = chr(ord("A") + index)
            return self._plan(choice, request, caller, (*why, f"{route.name}: split: arm {arm} {choice}"))
        if route.kind == "fallback":
            options = tuple(self._plan(t, request, caller, ()) for t in route.targets)
            return Fallback(route, options, why)
        return self._cascade(route, route.targets, request, caller, why)

    def _cascade(
        self,
        route: RouteEntry,
        targets: tuple[str, ...],
        request: generation_pb2.GenerateRequest,
        caller: str,
        why: tuple[str, ...],
    ) -> Plan:
        first = self._registry.lookup(targets[0])
        if len(targets) == 1 or not isinstance(first, ModelEntry) or first.backend != "triton":
            # The last step (or one without log-probabilities) answers as it is.
            return self._plan(targets[0], request, caller, why)
        return Cascade(route, first, self._cascade(route, targets[1:], request, caller, ()), why)
