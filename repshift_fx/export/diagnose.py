"""Why an export failed, in the user's terms: the op, the model's module, what to try.

torch.export and torch.onnx name the node they failed on ("While executing %wiggle", "Error when
translating node %wiggle"); an exported node points back, through its `from_node` provenance, to
the node of the compressed graph it came from, which knows its module path, or, for a node the
pass inserted, the block whose drop it serves.
"""
from __future__ import annotations

import re

import torch

from repshift_fx.context import inserted
from repshift_fx.errors import ExportError
from repshift_fx.fx.nodes import module_path, nodes_by_name, op_name

_NODE_IN_MESSAGE = re.compile(r"(?:While executing|translating node) %(\w+)")
_OP_IN_MESSAGE = re.compile(r"OpOverload\(op='([\w.:]+)'")
_ROLE_TEXT = {"score": "the shift score", "index": "the token selection (top-k)", "keep": "the gather of the kept tokens",
              "side": "the gather of a side tensor", "metric": "the merge metric", "match": "the merge matching",
              "merge": "the token merge", "size": "the token sizes", "bias": "the size bias of attention",
              "restore": "the token restore"}


def export_error(err: BaseException, gm: torch.fx.GraphModule, dynamic_batch: bool) -> ExportError:
    """torch.export failed on the compressed graph."""
    text = _messages(err)
    if dynamic_batch and "Constraints violated" in text:
        return ExportError("the model fixes its batch size (torch.export could not keep the batch axis dynamic); "
                           "export with dynamic_batch=False (repshift-fx export --static-batch) to fix it to the "
                           "example's")
    node = _gm_node(_named_nodes(text), gm)
    return _located("torch.export could not trace", node, gm, text, "make the op traceable (a custom op needs a "
                    "fake implementation, register_fake; no data-dependent Python control flow), or replace that "
                    "module with one torch.export can trace" + ("; if the model fixes its batch size, export with "
                    "dynamic_batch=False (--static-batch)" if dynamic_batch else ""))


def conversion_error(err: BaseException, gm: torch.fx.GraphModule, program) -> ExportError:
    """torch.onnx failed to translate the exported program."""
    text = _messages(err)
    names = _named_nodes(text)
    node = _from_exported(names, program, gm) or _by_op(_OP_IN_MESSAGE.findall(text), program, gm) \
        or _gm_node(names, gm)
    return _located("ONNX has no translation for", node, gm, text, "give torch.onnx a translation "
                    "(export(..., onnx_options={'custom_translation_table': {op: onnxscript_function}})), or "
                    "replace that module with standard ops")


def _located(what: str, node, gm, text: str, advice: str) -> ExportError:
    reason = _first_reason(text)
    if node is None:
        return ExportError(f"{what} the compressed model: {reason}; {advice}")
    record = inserted(node)
    if record is not None:
        block = _block_module(gm, record.block)
        where = f"{_ROLE_TEXT.get(record.role, record.role)} repshift_fx inserts after block {record.block}" + \
            (f" (module '{block}')" if block else "")
        advice = "try another schedule or option (score='shift', reduce='drop', fuse=False), or report the model"
        return ExportError(f"{what} {where}: {reason}; {advice}", module=block)
    module = module_path(node) or "the model's top level"
    op = op_name(node, gm)
    return ExportError(f"{what} op '{op}' in module '{module}': {reason}; {advice}",
                       node=node.name, module=module_path(node))


def _messages(err: BaseException) -> str:
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


def _first_reason(text: str) -> str:
    """The most specific line: the dispatcher's 'No ONNX function found ...', else the first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "No ONNX function found" in line or "no fake impl" in line.lower():
            return line.split("<class")[-1].split(">: ")[-1].rstrip(".")
    return lines[0].rstrip(".") if lines else "unknown error"


def _named_nodes(text: str) -> list[str]:
    return list(dict.fromkeys(_NODE_IN_MESSAGE.findall(text)))


def _gm_node(names: list[str], gm: torch.nn.Module):
    nodes = _nodes(gm)
    return next((nodes[name] for name in names if name in nodes), None)


def _from_exported(names: list[str], program, gm: torch.fx.GraphModule):
    """The compressed graph's node an exported node came from (its `from_node` provenance)."""
    exported = nodes_by_name(program.graph_module)
    for name in names:
        if name in exported:
            found = _source_in(exported[name], gm)
            if found is not None:
                return found
    return None


def _by_op(ops: list[str], program, gm: torch.fx.GraphModule):
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function" and any(str(node.target).startswith(op) for op in ops):
            return _source_in(node, gm)
    return None


def _source_in(node: torch.fx.Node, gm: torch.nn.Module):
    nodes = _nodes(gm)
    pending = list(node.meta.get("from_node") or [])
    while pending:
        source = pending.pop(0)
        if source.name in nodes:
            return nodes[source.name]
        pending.extend(source.from_node or [])
    return None


def _nodes(gm: torch.nn.Module) -> dict:
    """The graph's nodes by name; none for a module that is not a GraphModule (the unpruned model)."""
    return nodes_by_name(gm) if isinstance(gm, torch.fx.GraphModule) else {}


def _block_module(gm: torch.fx.GraphModule, block: int | None) -> str:
    report = getattr(gm, "report", None)
    rows = getattr(report, "blocks", None) or []
    return next((row.module for row in rows if row.index == block), "")
