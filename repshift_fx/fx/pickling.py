"""Pickling a compressed GraphModule (`torch.save(gm)`, multiprocessing) by its graph, not its code.

    gm = picklable(gm)                       # then torch.save(gm, path) / pickle.dumps(gm)

torch.fx pickles a GraphModule as its Python code and traces that code again when it is loaded;
the compressed graph's code calls what a symbolic trace cannot run on proxies (`len` of a token
count, torch.fx's own `_assert_is_none`), so that trace fails. A module made `picklable` pickles
its graph instead (the nodes' meta left out: the analysis' shapes and fake tensors; ATen operators,
which do not pickle, by name), the modules it calls, and its other attributes (`.report`, the input
guard, the modes). torch.fx gives every GraphModule a class of its own, so the change reaches this
module only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_REBUILT = ("_graph", "_code", "_lineno_map", "_modules", "_parameters", "_buffers")  # GraphModule() makes these


def picklable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    type(gm).__reduce__ = _reduce
    return gm


def _reduce(gm: torch.fx.GraphModule):
    graph, copies = torch.fx.Graph(tracer_cls=gm.graph._tracer_cls), {}
    for node in gm.graph.nodes:  # the graph's nodes, without meta, ATen operators by name
        args, kwargs = (torch.fx.map_arg(a, copies.__getitem__) for a in (node.args, node.kwargs))
        if node.op == "output":
            graph.output(args[0], type_expr=node.type)
            continue
        target = _Operator.of(node.target) if isinstance(node.target, torch._ops.OpOverload) else node.target
        copies[node] = graph.create_node(node.op, target, args, kwargs, node.name, node.type)
    graph._codegen = gm.graph._codegen
    holder = nn.Module()
    holder._modules, holder._parameters, holder._buffers = gm._modules, gm._parameters, gm._buffers
    others = {k: v for k, v in gm.__dict__.items() if k not in _REBUILT}
    modes = {path: m.training for path, m in gm.named_modules()}
    return _rebuild, (holder, graph, type(gm).__name__, others, modes)


def _rebuild(holder: nn.Module, graph: torch.fx.Graph, name: str, others: dict, modes: dict) -> torch.fx.GraphModule:
    for node in graph.nodes:
        if isinstance(node.target, _Operator):
            node.target = node.target.resolve()
    gm = torch.fx.GraphModule(holder, graph, name)
    gm.__dict__.update(others)
    for path, module in gm.named_modules():  # the containers GraphModule() makes are in training mode
        module.training = modes.get(path, gm.training)
    return picklable(gm)


@dataclass(frozen=True)
class _Operator:
    """An ATen operator overload by name: torch.ops.<namespace>.<name>.<overload>."""

    namespace: str
    name: str
    overload: str

    @classmethod
    def of(cls, op: torch._ops.OpOverload) -> "_Operator":
        return cls(op.namespace, op._schema.name.split("::")[-1], op._overloadname)

    def resolve(self) -> torch._ops.OpOverload:
        packet = getattr(getattr(torch.ops, self.namespace), self.name)
        return getattr(packet, self.overload or "default")

    def __call__(self, *args, **kwargs):  # a call_function target must be callable
        return self.resolve()(*args, **kwargs)
