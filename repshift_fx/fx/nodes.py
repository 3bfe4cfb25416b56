"""Small helpers that let passes read an FX graph the same way whoever produced it.

`symbolic_trace` writes `self.fc1(x)` (call_module), dynamo writes `F.linear(x, w, b)`
(call_function), and hand-written models write `x.softmax(-1)` (call_method). `op_name` maps all
of them to one lower-case name so that the passes match on meaning, not on call style.
"""
from __future__ import annotations

import operator
import re

import networkx as nx
import torch
import torch.fx
from torch import nn

_MODULE_OPS = {
    nn.Linear: "linear",
    nn.LayerNorm: "layer_norm",
    nn.BatchNorm1d: "batch_norm",
    nn.GELU: "gelu",
    nn.ReLU: "relu",
    nn.SiLU: "silu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Hardswish: "hardswish",
    nn.Dropout: "dropout",
    nn.Identity: "identity",
    nn.MultiheadAttention: "multihead_attention",
    nn.Softmax: "softmax",
}
if hasattr(nn, "RMSNorm"):
    _MODULE_OPS[nn.RMSNorm] = "rms_norm"

# stochastic depth: each sample's branch zeroed at random in training (timm, Hugging Face: DropPath; torchvision)
_DROP_PATH_CLASSES = ("DropPath", "StochasticDepth")


def is_drop_path(module: nn.Module) -> bool:
    return type(module).__name__.endswith(_DROP_PATH_CLASSES)


_FUNCTION_ALIASES = {
    operator.add: "add",
    operator.iadd: "add",
    operator.sub: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    operator.truediv: "truediv",
    operator.matmul: "matmul",
    operator.getitem: "getitem",
    operator.neg: "neg",
    # dynamo keeps nn.MultiheadAttention's functional core as one call (symbolic_trace: a leaf module)
    torch.nn.functional.multi_head_attention_forward: "multihead_attention",
}


def op_name(node: torch.fx.Node, gm: torch.fx.GraphModule | None = None) -> str:
    """The op a node performs, e.g. 'linear', 'layer_norm', 'softmax', 'matmul', 'add'."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        if node.target in _FUNCTION_ALIASES:
            return _FUNCTION_ALIASES[node.target]
        return getattr(node.target, "__name__", str(node.target)).lstrip("_")
    if node.op == "call_module" and gm is not None:
        module = gm.get_submodule(node.target)
        for cls in type(module).__mro__:
            if cls in _MODULE_OPS:
                return _MODULE_OPS[cls]
        if is_drop_path(module):
            return "drop_path"
        return "module:" + type(module).__name__
    return node.op


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imatmul, operator.ipow, operator.iand, operator.ior, operator.ixor}


def mutates(node: torch.fx.Node) -> bool:
    """An in-place call: `x.add_(y)`, `torch.relu_(x)`, `F.relu(x, inplace=True)`, `x += y`, an aten
    op whose schema writes an input. It changes an input, so it is not dead code when nothing reads
    its result (dynamo writes timm's `x.add_(pos_embed)` so), nor a no-op when it returns that input."""
    if node.op not in ("call_method", "call_function"):
        return False
    if node.kwargs.get("inplace") is True or node.target in _IN_PLACE_OPERATORS:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None and getattr(schema, "is_mutable", False):
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__") and name.strip("_") != ""


def is_impure(node: torch.fx.Node) -> bool:
    """`Node.is_impure` (placeholders, outputs, asserts, random ops) or an in-place call: what
    `graph.eliminate_dead_code(is_impure_node=is_impure)` must keep although no node reads it."""
    return node.is_impure() or mutates(node)


def shape(node) -> tuple[int, ...] | None:
    """The recorded output shape of a node, or None if it is not a tensor."""
    if not isinstance(node, torch.fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        value = node.meta.get("example_value", node.meta.get("val"))
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None
    return tuple(meta.shape)


def carries_tensor(node) -> bool:
    """True for a node whose value is a tensor or a tuple of tensors (unbind, chunk)."""
    if not isinstance(node, torch.fx.Node):
        return False
    if shape(node) is not None:
        return True
    meta = node.meta.get("tensor_meta", node.meta.get("example_value", node.meta.get("val")))
    return isinstance(meta, (tuple, list)) and any(
        hasattr(m, "shape") for m in meta
    )


def tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The inputs of `node` that carry tensors (sizes and other Python values left out)."""
    found: list[torch.fx.Node] = []
    torch.fx.map_arg((node.args, node.kwargs), lambda a: found.append(a) if carries_tensor(a) else None)
    return found


_METADATA_READERS = {"new_empty", "new_zeros", "new_ones", "new_full", "empty_like", "zeros_like", "ones_like",
                     "full_like", "rand_like", "randn_like"}


def _per_sample_draw(node: torch.fx.Node) -> bool:
    """A tensor made from another's dtype, device and batch alone, one value per sample (B, 1, ..., 1):
    drop-path's random mask (`x.new_empty((B, 1, 1)).bernoulli_(p)`). It carries none of its data."""
    found = shape(node)
    return op_name(node) in _METADATA_READERS and found is not None and len(found) >= 2 and all(s == 1 for s in found[1:])


def data_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """Tensor data flow as a networkx DiGraph over node names (size computations left out, and the
    reads of a per-sample draw, which take only a tensor's dtype, device and batch)."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name)
        if _per_sample_draw(node):
            continue
        for arg in tensor_args(node):
            graph.add_edge(arg.name, node.name)
    return graph


def nodes_by_name(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    return {node.name: node for node in gm.graph.nodes}


_DYNAMO_PATH = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the innermost module a node was traced in ('' at the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return module_path_text(str(list(stack.values())[-1][0]))


def module_paths(node: torch.fx.Node) -> list[str]:
    """The dotted paths of every module a node was traced in, outermost first (the root left out);
    a `call_module` node ends with its own module."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [module_path_text(str(entry[0])) for entry in stack.values()]
    if node.op == "call_module":
        paths.append(str(node.target))
    return list(dict.fromkeys(p for p in paths if p))


def module_path_text(path: str) -> str:
    """A dotted path from dynamo's source text, where no root module is at hand to resolve it."""
    path = _DYNAMO_PATH.sub(r".\1", path)  # L['self'].blocks[0].mlp -> L.self.blocks.0.mlp
    path = re.sub(r"^L\.self\.?|^self\.?", "", path)
    path = re.sub(r"^[LG]\.", "", path)  # dynamo: a module held in another local or a global, L['vit'].blocks[1]
    return re.sub(r"\._modules\.|\.modules\.", ".", path).strip(".")


def _resolves(root: nn.Module, parts: list[str], cls) -> bool:
    try:
        module = root.get_submodule(".".join(parts))
    except AttributeError:
        return False
    return not isinstance(cls, type) or isinstance(module, cls)


def user_path(raw: str, root: nn.Module, cls=None) -> str:
    """A module path as the user's own `root.get_submodule` resolves it.

    Capture paths prefix what they were handed: dynamo writes `L['self'].blocks[0]`, and a
    forward wrapped by a decorator (Hugging Face's) reaches the model as `L['args'][0]`. The
    longest tail of the path that resolves on `root` to a module of type `cls` is the user's."""
    parts = [p for p in _DYNAMO_PATH.sub(r".\1", str(raw)).split(".") if p and p not in ("_modules", "modules")]
    for start in range(len(parts) + 1):
        if _resolves(root, parts[start:], cls):
            return ".".join(parts[start:])
    return module_path_text(str(raw))


def name_modules_as_user(gm: torch.fx.GraphModule, root: nn.Module | None) -> None:
    """Rewrite every node's `nn_module_stack` paths to the user's paths on `root` (see `user_path`)."""
    if root is None:
        return
    known: dict = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        for key, (path, cls) in list(stack.items()):
            if (path, cls) not in known:
                known[path, cls] = user_path(path, root, cls)
            stack[key] = (known[path, cls], cls)


def within_module(path: str | None, outer: str | None) -> bool:
    """`path` names module `outer` or a module inside it ("blocks.3.attn" within "blocks.3")."""
    return bool(path) and bool(outer) and (path == outer or path.startswith(outer + "."))


def module_phrase(path: str | None) -> str:
    """"module 'blocks.0.attn'", or "the model's top-level forward" for the root: where something lies,
    in the model's terms (a message names modules, never the traced graph's node names)."""
    return f"module '{path}'" if path else "the model's top-level forward"


def in_module(node: torch.fx.Node) -> str:
    """`module_phrase` of the module a node lies in."""
    return module_phrase(module_path(node))


def where(node: torch.fx.Node, gm: torch.fx.GraphModule | None = None) -> str:
    """"softmax in module 'blocks.0.attn'", for messages about a node."""
    return f"{op_name(node, gm)} in {in_module(node)}"


_VALUE_WORDS = {"getitem": "a slice", "add": "a sum", "sub": "a difference", "mul": "a product",
                "truediv": "a quotient", "cat": "a concatenation", "stack": "a stack", "matmul": "a matrix product"}


def value_phrase(node: torch.fx.Node, gm: torch.fx.GraphModule | None = None, blocks=()) -> str:
    """A value of the graph as the model's reader knows it, by module path and role, never by the
    capture's node name: "the output of block 2 (blocks.2)" (`blocks`: the analysis's, with `.index`,
    `.input`, `.output` and `.module`), "the output of module 'stem', the input of block 0 (block0)",
    "a slice of the output of module 'features.2.conv'", "the model's tensor 'pos_embed'", "an input of the model"."""
    role = next((f"the {role} of block {block.index}" + (f" ({block.module})" if block.module else "")
                 for block in blocks for role in ("input", "output") if getattr(block, role) == node.name), None)
    if node.op == "call_module":
        return f"the output of module '{node.target}'" + (f", {role}" if role else "")
    if role:
        return role
    if node.op == "placeholder":
        return "an input of the model"
    if node.op == "get_attr":
        target = str(node.target)
        return f"the model's tensor '{target}'" if not re.match(r"[lL]__|_tensor_constant", target) else \
            f"a parameter or buffer read in {in_module(node)}"
    op = op_name(node, gm)
    source = node.args[0] if node.args else None
    if op == "getitem" and isinstance(source, torch.fx.Node) and source.op != "placeholder":
        return f"a slice of {value_phrase(source, gm, blocks)}"
    return f"{_VALUE_WORDS.get(op, f'the result of {op}')} in {in_module(node)}"


_DYNAMO_INPUT = re.compile(r"[lL]_(?:kwargs_|args_)?(.+?)_")  # dynamo's placeholder for forward parameter x: l_x_


def input_name(gm: torch.fx.GraphModule, node: torch.fx.Node, args=()) -> str:
    """The keyword the user gave for a placeholder (`args.names`: a dict example), else the forward
    parameter it stands for (dynamo names it l_attention_mask_)."""
    names = getattr(args, "names", ())
    position = [n for n in gm.graph.nodes if n.op == "placeholder"].index(node)
    if position < len(names):
        return names[position]
    match = _DYNAMO_INPUT.fullmatch(node.name)
    return match.group(1) if match else str(node.target)


def located(node: torch.fx.Node) -> dict:
    """The `node=` and `module=` fields of an error about `node` (RepShiftError)."""
    return {"node": node.name, "module": module_path(node)}


def reachable(start_nodes, step) -> set[torch.fx.Node]:
    """Every node reachable from `start_nodes` by `step` (`lambda n: n.users` downstream,
    `lambda n: n.all_input_nodes` upstream), the start nodes included."""
    seen = set(start_nodes)
    todo = list(seen)
    while todo:
        for nxt in step(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def common_path(paths) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    prefix = parts[0]
    for other in parts[1:]:
        n = 0
        while n < min(len(prefix), len(other)) and prefix[n] == other[n]:
            n += 1
        prefix = prefix[:n]
    return ".".join(prefix)


def literal_arg(node: torch.fx.Node, index: int, name: str, default=None):
    """Argument `index` (positional) or `name` (keyword) of a call, or `default`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


ATTENTION_CALLS = ("scaled_dot_product_attention", "explicit_attention")  # (q, k, v, ...) alike


def keys_before(node: torch.fx.Node) -> torch.fx.Node | None:
    """The key (B, H, N, D) of the latest attention call upstream of `node` (the block's own
    attention), where it runs over `node`'s N tokens; None without one (or with spatially reduced keys)."""
    attention = last_attention_before(node)
    key = literal_arg(attention, 1, "key") if attention is not None else None
    return key if key is not None and (shape(key) or ())[-2:-1] == (shape(node) or ())[1:2] else None


def regions(starts: list[torch.fx.Node], stop) -> dict[torch.fx.Node, int]:
    """Which of `starts` each node lies downstream of (the latest), not walking past a node for
    which `stop(node)` holds: `{node: k}`."""
    region: dict[torch.fx.Node, int] = {}
    for k, start in enumerate(starts):
        todo = [start]
        while todo:
            for user in todo.pop().users:
                if region.get(user) != k and not stop(user):
                    region[user] = k
                    todo.append(user)
    return region


def last_attention_before(node: torch.fx.Node) -> torch.fx.Node | None:
    """The latest attention call (SDPA, or the explicit form score="attention" puts in a scoring
    block: same arguments) upstream of `node`, in graph order."""
    upstream = reachable([node], lambda n: n.all_input_nodes)
    found = [n for n in upstream if n.op == "call_function" and op_name(n) in ATTENTION_CALLS]
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return max(found, key=order.__getitem__) if found else None
