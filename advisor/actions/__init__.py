"""What a plan can do to one compressible unit (a linear layer or a decoder layer), registered by name.

A recipe names actions by registry key only (recipes may come from the Hub, so never by import path). A new kind of
action is one module here with a class decorated by `register`, plus its import below.
"""

from __future__ import annotations

from advisor.actions.base import ACTIONS, Action, StructureContext, parse_action, register
from advisor.actions.factorize import Factorize
from advisor.actions.prune import Prune
from advisor.actions.quantize import KeepDense, Quantize
from advisor.actions.remove_layer import RemoveLayer

__all__ = ["ACTIONS", "Action", "Factorize", "KeepDense", "Prune", "Quantize", "RemoveLayer", "StructureContext",
           "parse_action", "register"]
