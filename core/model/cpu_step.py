"""One new token per sequence through every layer, on the CPU, run by TorchScript's interpreter.

Decoding one token on the CPU is a few microseconds of arithmetic per tensor operation, and Python pays
2-3 µs to dispatch each one (argument parsing, the module tree, views). Measured on 2 cores with torch
2.13: the 6-layer GPT-2 shape in float16 spent 1.50 ms a step in `Transformer.decode`'s Python loop and
0.86 ms in this one, for the same operations; an int8 layer's two-row wrapper (core/model/quant.py) costs 55-65
µs in Python and about 9 µs here. torch.compile cannot do this: fbgemm's packed weights break its graph
at every linear layer.

`Transformer.decode` runs this loop instead of its own on the CPU (one row at a Python-int position, the
eager step, or several rows at their own positions, the batched engine's step) when `build(model)` can
describe the model: the same operations in the same order, so the results are bitwise those of the
Python loop (tests check it). A model it cannot describe (attention
soft-caps, a module it does not know such as an adapter, a hook on a module, int8 weights without
fbgemm or Sol's kernel) or a torch without TorchScript keeps the Python loop.

Where every linear layer runs in Sol's int8 kernel, one row at `at` goes further: int8_step.cpp runs the
whole token in one native call (see _native), the same arithmetic to float32 rounding, not bitwise.

No `from __future__ import annotations` here: TorchScript reads the annotations.
"""
import math
import warnings
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import int8_kernel
from .blockquant import BlockLinear
from .half import HalfLinear
from .quant import FULL_CODES, Int8Linear, _fbgemm, fbgemm_codes

# Kinds of linear layer, norm and MLP, as the scripted loop tells them apart.
LIN_FLOAT, LIN_HALF, LIN_INT8, LIN_INT8_DEQUANT, LIN_INT8_KERNEL, LIN_BLOCKS = 0, 1, 2, 3, 4, 5
NORM_LAYER, NORM_RMS, NORM_RMS_PLUS_ONE = 0, 1, 2
MLP_GELU, MLP_SWIGLU, MLP_GEGLU = 0, 1, 2
# Norm slots per layer in the plan's lists: ln1, ln2, post-attention, post-MLP, q, k.
NORMS_PER_LAYER = 6


# ---- the scripted arithmetic (each function mirrors its Python original, named beside it) ------------
def _norm(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], kind: int, eps: float) -> torch.Tensor:
    """model._norm / RMSNorm.forward."""
    if kind == 0:
        return F.layer_norm(x, [x.size(-1)], w, b, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if kind == 2:
        return (h * (1.0 + w.float())).to(x.dtype)
    return w * h.to(x.dtype)


def _int8_rows(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase, out: int,
               bias: Optional[torch.Tensor], weights: torch.Tensor, codes: List[float]) -> torch.Tensor:
    """Int8Linear._fbgemm: the activations in steps of s as int8 rows, their value and lo x each rounding
    remainder, weighed by `weights` (1, rows); codes = [top, zero, lo, rows] (quant.fbgemm_codes())."""
    x2 = x.reshape(-1, x.size(-1))
    if x2.dtype != torch.float32:
        x2 = x2.float()
    n = x2.size(0)
    s = float(x2.abs().max()) / codes[0]
    if s == 0.0:
        s = 1.0
    count = int(codes[3])
    t = x2 * (1.0 / s)
    rows = [t]
    for _ in range(count - 1):
        t = torch.sub(t, t.round()).mul_(codes[2])
        rows.append(t)
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(torch.cat(rows), 1.0, int(codes[1]), packed)
    if n == 1 and bias is not None:
        y = torch.addmm(bias.view(1, -1), weights, y, alpha=s)
    else:
        y = torch.mm(weights, y.view(count, -1)).view(n, -1)
        y = y.mul_(s) if bias is None else torch.add(bias, y, alpha=s)
    shape = x.size()[:-1] + [out]
    y = y.view(shape)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _int8_kernel(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                 out: int) -> torch.Tensor:
    """Int8Linear._kernel (int8_kernel.linear): Sol's int8 kernel on blocked weights. The input size is x's:
    the plan's layers take their inputs from the model's own previous step."""
    x2 = x.reshape(-1, x.size(-1))
    if x2.dtype != torch.float32:
        x2 = x2.float()
    y = torch.ops.sol_int8.linear(x2.contiguous(), w, scales, bias, x2.size(1), out)
    shape = x.size()[:-1] + [out]
    y = y.view(shape)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _blocks(x: torch.Tensor, parts: List[torch.Tensor], types: List[int], bias: Optional[torch.Tensor],
            out: int) -> torch.Tensor:
    """BlockLinear.forward (blocks.linear): GGUF blocks in Sol's block kernels."""
    x2 = x.reshape(-1, x.size(-1))
    if x2.dtype != torch.float32:
        x2 = x2.float()
    y = torch.ops.sol_blocks.linear(x2.contiguous(), parts, types, bias, x2.size(1), out)
    shape = x.size()[:-1] + [out]
    y = y.view(shape)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _linear(x: torch.Tensor, j: int, kind: List[int], w: List[torch.Tensor], b: List[Optional[torch.Tensor]],
            scales: List[torch.Tensor], slot: List[int],
            packed: List[torch.classes.quantized.LinearPackedParamsBase], out: List[int],
            codes: List[float], parts: List[List[torch.Tensor]], ptypes: List[List[int]]) -> torch.Tensor:
    """model._linear for linear layer j: nn.Linear, HalfLinear, Int8Linear or BlockLinear."""
    k = kind[j]
    if k == 0:
        return F.linear(x, w[j], b[j])
    if k == 1:
        y = torch.ops.quantized.linear_dynamic_fp16(x.float(), packed[slot[j]])
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    if k == 2:
        return _int8_rows(x, packed[slot[j]], out[j], b[j], scales[j], codes)
    if k == 4:
        return _int8_kernel(x, w[j], scales[j], b[j], out[j])
    if k == 5:
        return _blocks(x, parts[j], ptypes[j], b[j], out[j])
    y = F.linear(x, w[j].to(x.dtype)) * scales[j].to(x.dtype)
    bias = b[j]
    return y if bias is None else y + bias.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.apply_rope (partial RoPE: the rest of each head passes through)."""
    d = cos.size(-1)
    n = x.size(-1)
    xr = x if d >= n else x[..., :d]
    half = xr.size(-1) // 2
    rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    y = (xr * cos + rotated * sin).to(xr.dtype)
    return y if d >= n else torch.cat((y, x[..., d:]), dim=-1)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor],
            H: int, KV: int, hd: int, scale: float) -> torch.Tensor:
    """model.decode_attention on the CPU (no soft-cap): one row in PyTorch's fused attention, several in
    two products and a softmax under the rows' masks."""
    B = q.size(0)
    if B == 1:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=KV != H)
    scores = torch.matmul(q.view(B, KV, H // KV, hd), keys.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values).view(B, H, 1, hd)


def _layers(x: torch.Tensor, at: int, pos: torch.Tensor, masks: List[torch.Tensor], mask_of: List[int],
            ks: List[torch.Tensor], vs: List[torch.Tensor],
            cos: List[torch.Tensor], sin: List[torch.Tensor],
            kind: List[int], w: List[torch.Tensor], b: List[Optional[torch.Tensor]], scales: List[torch.Tensor],
            slot: List[int], packed: List[torch.classes.quantized.LinearPackedParamsBase], out: List[int],
            codes: List[float], parts: List[List[torch.Tensor]], ptypes: List[List[int]],
            norm_w: List[torch.Tensor], norm_b: List[Optional[torch.Tensor]], norm_kind: int, eps: float,
            post_norms: bool, qk_norm: bool, windows: List[int], rope_of: List[int],
            H: int, KV: int, hd: int, scale: float, mlp: int) -> torch.Tensor:
    """Transformer.decode's loop over the blocks, and the final norm: x (B, 1, d_model), one new token
    per row. `at` >= 0: one row at that position, attending to the filled part of its cache only; `at`
    < 0: row b at pos[b], attending to the whole cache under masks[mask_of[layer]]."""
    B = x.size(0)
    where = pos.view(B, 1, 1, 1).expand(B, KV, 1, hd)
    for i in range(len(ks)):
        nw = 6 * i   # NORMS_PER_LAYER (TorchScript reads no global numbers)
        h = _norm(x, norm_w[nw], norm_b[nw], norm_kind, eps)
        qkv = _linear(h, 4 * i, kind, w, b, scales, slot, packed, out, codes, parts, ptypes).view(B, H + 2 * KV, 1, hd)
        heads = qkv.split([H, KV, KV], dim=1)
        q, k, v = heads[0], heads[1], heads[2]
        if qk_norm:
            q = _norm(q, norm_w[nw + 4], norm_b[nw + 4], norm_kind, eps)
            k = _norm(k, norm_w[nw + 5], norm_b[nw + 5], norm_kind, eps)
        r = rope_of[i]
        if r >= 0:
            q, k = _rope(q, cos[r], sin[r]), _rope(k, cos[r], sin[r])
        mask: Optional[torch.Tensor] = None
        if at >= 0:
            ks[i][:1, :, at:at + 1].copy_(k)
            vs[i][:1, :, at:at + 1].copy_(v)
            start = 0 if windows[i] < 0 else max(0, at + 1 - windows[i])
            keys, values = ks[i][:1, :, start:at + 1], vs[i][:1, :, start:at + 1]
        else:
            keys, values = ks[i][:B], vs[i][:B]
            keys.scatter_(2, where, k.to(keys.dtype))
            values.scatter_(2, where, v.to(values.dtype))
            mask = masks[mask_of[i]]
        y = _attend(q.to(keys.dtype), keys, values, mask, H, KV, hd, scale).to(x.dtype)
        a = _linear(y.view(B, 1, H * hd), 4 * i + 1, kind, w, b, scales, slot, packed, out, codes, parts, ptypes)
        if post_norms:
            a = _norm(a, norm_w[nw + 2], norm_b[nw + 2], norm_kind, eps)
        x = x + a
        h = _linear(_norm(x, norm_w[nw + 1], norm_b[nw + 1], norm_kind, eps), 4 * i + 2,
                    kind, w, b, scales, slot, packed, out, codes, parts, ptypes)
        if mlp == 0:
            h = F.gelu(h, approximate="tanh")
        else:
            gate_up = h.chunk(2, dim=-1)
            if mlp == 1:
                h = F.silu(gate_up[0]) * gate_up[1]
            else:
                h = F.gelu(gate_up[0], approximate="tanh") * gate_up[1]
        m = _linear(h, 4 * i + 3, kind, w, b, scales, slot, packed, out, codes, parts, ptypes)
        if post_norms:
            m = _norm(m, norm_w[nw + 3], norm_b[nw + 3], norm_kind, eps)
        x = x + m
    last = 6 * len(ks)
    return _norm(x, norm_w[last], norm_b[last], norm_kind, eps)


_SCRIPTED = None   # the scripted _layers, or False where TorchScript is missing or failed


def scripted():
    """_layers compiled by TorchScript (once per process), or None where it cannot be."""
    global _SCRIPTED
    if _SCRIPTED is None:
        try:
            with warnings.catch_warnings():   # torch.jit is deprecated in favour of torch.compile (see above)
                warnings.simplefilter("ignore")
                _SCRIPTED = torch.jit.script(_layers)
        except Exception:   # no source (a frozen install), or a torch whose TorchScript is gone
            _SCRIPTED = False
    return _SCRIPTED or None


# ---- the plan: the model's tensors and switches, in the lists _layers reads -----------------------------
class Plan:
    """A model's layers as _layers' arguments, and what must still hold for them to be the model's."""

    def __init__(self, args: dict, children: list, held: list, windows: list, native=None):
        self.mark = None           # core/changes.mark() when last checked
        self.args = args
        self.native = native       # the native one-row step (int8_step.cpp), where every layer is in the kernel
        self.windows = sorted(set(windows), key=lambda wnd: -1 if wnd is None else wnd)   # distinct, in order
        self.mask_of = [self.windows.index(wnd) for wnd in windows]   # each layer's mask
        self.children = children   # (parent, name, module): still the parent's child, with no hooks
        self.held = held           # (a module's dict, key, value): what the plan took from the module

    def needs_check(self, mark) -> bool:
        return mark != self.mark

    def valid(self) -> bool:
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        for parent, name, child in self.children:
            if parent._modules.get(name) is not child:
                return False
            if child is not None and (child._forward_hooks or child._forward_pre_hooks):
                return False
        for where, key, value in self.held:
            if where.get(key) is not value:
                return False
        return True

    def run(self, x: torch.Tensor, pos: torch.Tensor, at, cache, ropes, masks=None) -> torch.Tensor:
        """at: one row's position (an int), or None for rows at `pos` under `masks` ({window: mask})."""
        cos = [c for c, _ in ropes] if ropes else []
        sin = [s for _, s in ropes] if ropes else []
        if (at is not None and self.native is not None and _NATIVE and x.dtype == torch.float32
                and cache.k[0].dtype == torch.float32 and all(c.dtype == torch.float32 for c in cos + sin)):
            return self.native.run(x, at, cache.k, cache.v, cos, sin)
        if at is None:
            order = self.windows
            mask_list = [masks[wnd] for wnd in order]
            return scripted()(x, -1, pos, mask_list, self.mask_of, cache.k, cache.v, cos, sin, **self.args)
        return scripted()(x, at, pos, [], self.mask_of, cache.k, cache.v, cos, sin, **self.args)


class _Global:
    """Stands for torch's global module hooks in a Refusal."""
    @property
    def _forward_hooks(self):
        return nn.modules.module._global_forward_hooks

    @property
    def _forward_pre_hooks(self):
        return nn.modules.module._global_forward_pre_hooks


_GLOBAL = _Global()


class Refusal:
    """Why a model keeps the Python loop. A hooked module's refusal lasts while the hook does; any other
    until some module changes (a float16 layer packed at its first forward, say), when the model is
    looked at again."""

    def __init__(self, hooked=None):
        self.mark = None
        self.hooked = hooked

    def needs_check(self, mark) -> bool:
        return mark != self.mark or self.hooked is not None   # a hook's removal moves no counter

    def valid(self) -> bool:
        m = self.hooked
        return m is not None and bool(m._forward_hooks or m._forward_pre_hooks)


class _Unsupported(Exception):
    def __init__(self, hooked=None):
        super().__init__()
        self.hooked = hooked


def build(model):
    """The Plan of `model` (a Transformer on the CPU), or a Refusal where the scripted loop cannot run it."""
    try:
        return _build(model)
    except _Unsupported as e:
        return Refusal(e.hooked)


def _build(model) -> Plan:
    from .layers import _SDPA_HAS_GQA, MLP, Attention, Block, RMSNorm
    cfg = model.cfg
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        raise _Unsupported(hooked=_GLOBAL)
    if cfg.attn_softcap is not None or (cfg.n_kv_head != cfg.n_head and not _SDPA_HAS_GQA):
        raise _Unsupported
    kind, w, b, scales, slot, packed, out, norm_w, norm_b, ins = [], [], [], [], [], [], [], [], [], []
    parts, ptypes = [], []   # a BlockLinear's parts and their GGML types; empty lists for other layers
    children, held = [], []
    empty = torch.empty(0)

    def child(parent, name, types):
        m = parent._modules.get(name)
        if type(m) not in types:
            raise _Unsupported
        if m._forward_hooks or m._forward_pre_hooks:
            raise _Unsupported(hooked=m)
        children.append((parent, name, m))
        return m

    def add_linear(parent, name):
        m = child(parent, name, (nn.Linear, HalfLinear, Int8Linear, BlockLinear))
        parts.append([])
        ptypes.append([])
        if type(m) is nn.Linear:
            entry = (LIN_FLOAT, m.weight, m.bias, empty, None)
        elif type(m) is BlockLinear:
            if (m.bias is not None and m.bias.dtype != torch.float32) or not int8_kernel.loaded():
                raise _Unsupported   # the kernels add a float32 bias; without them it dequantizes
            entry = (LIN_BLOCKS, empty, m.bias, empty, None)
            parts[-1], ptypes[-1] = m.parts, list(m.types)
            held.extend((m._buffers, f"part{i}", t) for i, t in enumerate(m.parts))
        elif type(m) is HalfLinear:
            if m._packed is None:
                raise _Unsupported
            entry = (LIN_HALF, empty, None, empty, m._packed)
        else:
            if m._packed is None and m._blocked is None and not m._declined:
                m.pack()   # as its first CPU forward would
            packed_form = m._packed is not None or m._blocked is not None
            if packed_form and m.bias is not None and m.bias.dtype != torch.float32:
                raise _Unsupported   # both products add a float32 bias
            if m._blocked is not None:
                if m.scales.dtype != torch.float32:
                    raise _Unsupported   # the kernel takes float32 scales
                entry = (LIN_INT8_KERNEL, m._blocked, m.bias, m.scales, None)
            elif not _fbgemm():
                raise _Unsupported   # aten._weight_int8pack_mm's path: the Python loop
            elif m._packed is not None:
                entry = (LIN_INT8, empty, m.bias, fbgemm_codes().row_weights(), m._packed)
            else:
                entry = (LIN_INT8_DEQUANT, m.weight, m.bias, m.scales, None)
            held.append((m._buffers, "scales", m.scales))
            held.append((m.__dict__, "_blocked", m._blocked))
        if type(m) in (HalfLinear, Int8Linear):
            held.append((m.__dict__, "_packed", m._packed))
        for name in ("bias",) if type(m) is BlockLinear else ("weight", "bias"):
            held.append((m._buffers if name in m._buffers else m._parameters, name, getattr(m, name)))
        k, weight, bias, scale, pack = entry
        kind.append(k)
        w.append(weight)
        b.append(bias)
        scales.append(scale)
        slot.append(-1 if pack is None else len(packed))
        if pack is not None:
            packed.append(pack)
        out.append(m.out_features)
        ins.append(m.in_features)

    def add_norm(parent, name):
        if parent._modules.get(name) is None:
            children.append((parent, name, None))
            norm_w.append(empty)
            norm_b.append(None)
            return
        m = child(parent, name, (nn.LayerNorm, RMSNorm))
        if type(m) is nn.LayerNorm:
            if m.weight is None or m.eps != cfg.norm_eps or cfg.norm != "layernorm" or len(m.normalized_shape) != 1:
                raise _Unsupported
        elif m.eps != cfg.norm_eps or m.plus_one != cfg.norm_plus_one or cfg.norm != "rmsnorm":
            raise _Unsupported
        norm_w.append(m.weight)
        norm_b.append(getattr(m, "bias", None))
        for name in ("weight", "bias"):
            held.append((m._buffers if name in m._buffers else m._parameters, name, getattr(m, name, None)))

    for i in range(cfg.n_layer):
        block = child(model.blocks, str(i), (Block,))
        attn = child(block, "attn", (Attention,))
        mlp = child(block, "mlp", (MLP,))
        if attn.softcap is not None:
            raise _Unsupported
        for parent, name in ((attn, "qkv"), (attn, "proj"), (mlp, "fc"), (mlp, "proj")):
            add_linear(parent, name)
        for parent, name in ((block, "ln1"), (block, "ln2"), (block, "post_attn_norm"), (block, "post_mlp_norm"),
                             (attn, "q_norm"), (attn, "k_norm")):
            add_norm(parent, name)
    add_norm(model, "norm")
    first = model.blocks[0].mlp
    ropes = model.pos_embed is None
    codes = fbgemm_codes() if LIN_INT8 in kind else FULL_CODES
    args = dict(kind=kind, w=w, b=b, scales=scales, slot=slot, packed=packed, out=out,
                codes=[float(c) for c in codes], parts=parts, ptypes=ptypes,
                norm_w=norm_w, norm_b=norm_b,
                norm_kind=NORM_LAYER if cfg.norm != "rmsnorm" else NORM_RMS_PLUS_ONE if cfg.norm_plus_one else NORM_RMS,
                eps=float(cfg.norm_eps), post_norms=cfg.post_norms, qk_norm=cfg.qk_norm,
                windows=[-1 if cfg.window(i) is None else cfg.window(i) for i in range(cfg.n_layer)],
                rope_of=[model._rope_of[i] if ropes else -1 for i in range(cfg.n_layer)],
                H=cfg.n_head, KV=cfg.n_kv_head, hd=cfg.head_dim,
                scale=float(cfg.attn_scale) if cfg.attn_scale is not None else 1.0 / math.sqrt(cfg.head_dim),
                mlp=MLP_SWIGLU if first.swiglu else MLP_GEGLU if first.geglu else MLP_GELU)
    return Plan(args, children, held, [cfg.window(i) for i in range(cfg.n_layer)],
                _native(args, ins, cfg.d_model))


# ---- the native step: one call a token where every linear layer runs in Sol's int8 kernel -----------------
_NATIVE = True   # False: the scripted loop for every plan (the tests compare the two)


def _native(args: dict, ins: list, d_model: int):
    """int8_step.cpp's Step for the plan's model, or None where it does not take the model: a layer outside
    Sol's kernels (int8 or GGUF blocks), or norms not in float32 (it computes in float32, as the scripted
    loop then does).

    The scripted loop spends ~15 tensor operations a block around the int8 products; on GPT-2 124M that was
    ~2.5 ms a token beside the products' ~4.4 ms (2-core AVX2 EPYC). The native step runs them as plain loops
    over the token's few thousand numbers."""
    if not args["kind"] or not set(args["kind"]) <= {LIN_INT8_KERNEL, LIN_BLOCKS}:
        return None
    if any(t.numel() and t.dtype != torch.float32 for t in args["norm_w"] + [b for b in args["norm_b"] if b is not None]):
        return None
    empty = torch.empty(0)
    tensors, sizes, parts, ptypes = [], [], [], []
    layers = len(args["windows"])
    for i in range(layers):
        for j in range(4 * i, 4 * i + 4):
            bias = args["b"][j]
            tensors += [args["w"][j], args["scales"][j], empty if bias is None else bias]
            # in, out, and how many GGUF parts the layer has (0: int8 rows in w and scales)
            sizes += [ins[j], args["out"][j], len(args["parts"][j])]
            parts += args["parts"][j]
            ptypes += args["ptypes"][j]
        for j in range(NORMS_PER_LAYER * i, NORMS_PER_LAYER * (i + 1)):
            bias = args["norm_b"][j]
            tensors += [args["norm_w"][j], empty if bias is None else bias]
    last = NORMS_PER_LAYER * layers
    tensors += [args["norm_w"][last], empty if args["norm_b"][last] is None else args["norm_b"][last]]
    ints = [layers, d_model, args["H"], args["KV"], args["hd"], args["norm_kind"], int(args["post_norms"]),
            int(args["qk_norm"]), args["mlp"]]
    for i in range(layers):
        ints += [args["windows"][i], args["rope_of"][i]]
    try:
        return torch.classes.sol_step.Step(tensors, ints + sizes, [args["eps"], args["scale"]], parts, ptypes)
    except (RuntimeError, AttributeError):   # a library without the step, or sizes it does not take
        return None
