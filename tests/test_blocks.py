"""Sol's GGUF block kernels (core/kernels/blocks.cpp): each type against gguf's own dequantization, on random and
extreme blocks; models that run from a file's blocks, in the scripted loop and the native step; and files whose
blocks are damaged, refused in one line naming the tensor."""
import io
from contextlib import redirect_stdout

import gguf
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, require_int8_kernel
from gguf.quants import dequantize, quantize

from sol.core.cli import main
from sol.core.formats import gguf_io
from sol.core.formats.checkpoint import load_model
from sol.core.kernels import blocks
from sol.core.model import cpu_step
from sol.core.model.blockquant import BlockEmbedding, BlockLinear, BlockRows, block_types
from sol.core.model.config import ModelConfig
from sol.core.model.transformer import Transformer

Q = gguf.GGMLQuantizationType
QUANTS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
SCALES = {"Q4_0": [(0, 1e-3, 0.02)], "Q5_0": [(0, 1e-3, 0.02)], "Q8_0": [(0, 1e-3, 0.02)],
          "Q4_1": [(0, 1e-3, 0.02), (2, -0.1, 0.1)], "Q5_1": [(0, 1e-3, 0.02), (2, -0.1, 0.1)],
          "Q4_K": [(0, 5e-4, 2e-3), (2, 5e-4, 2e-3)], "Q5_K": [(0, 5e-4, 2e-3), (2, 5e-4, 2e-3)],
          "Q6_K": [(208, 1e-4, 1e-3)]}


@pytest.fixture(autouse=True)
def _kernels():
    require_int8_kernel()   # the block kernels are part of the same library


def random_blocks(type_name, rows, width, rng, scale=None):
    """rows x width numbers of a type as raw blocks: random codes, float16 scales in a sane range (or all
    `scale`); F16 and BF16 as random normal numbers."""
    if type_name in ("F16", "BF16"):
        f = rng.standard_normal((rows, width)).astype(np.float32)
        if type_name == "F16":
            return f.astype(np.float16).view(np.uint8).reshape(rows, -1)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, -1)
    _, numbers, size = blocks.BLOCKS[type_name]
    raw = rng.integers(0, 256, size=(rows, width // numbers, size), dtype=np.uint8)
    for at, lo, hi in SCALES[type_name]:
        d = np.full((rows, width // numbers), scale if scale is not None else 0, np.float16) if scale is not None \
            else rng.uniform(lo, hi, size=(rows, width // numbers)).astype(np.float16)
        raw[:, :, at:at + 2] = d.view(np.uint8).reshape(rows, -1, 2)
    return raw.reshape(rows, -1)


def as_float(raw, type_name, width):
    return torch.from_numpy(dequantize(raw, Q[type_name]).reshape(-1, width).astype(np.float64))


def int8_activations(x, block):
    """The activations as the kernels see them, rounded as llama.cpp rounds them: codes round(x * 127 / max)
    per block, the step max / 127 kept as float16 for blocks of 32 (Q8_0, Q8_1), 1 / (127 / max) for 256 (Q8_K)."""
    xb = x.float().reshape(x.shape[0], -1, block)
    top = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(top > 0, 127 / top, torch.zeros_like(top))
    q = torch.round(xb * inv).double()
    d = (top / 127).half().double() if block == 32 else torch.where(inv > 0, 1 / inv, inv).double()
    return (q * d).reshape(x.shape)


# Q4_1 and Q5_1 meet llama.cpp's Q8_1 activations, whose d * sum(q) is kept as float16: their min's share of
# a product is off by up to 2^-11 of it.
TOLERANCE = {"Q4_1": 2e-3, "Q5_1": 2e-3}


@pytest.mark.parametrize("type_name", QUANTS + ["F16", "BF16"])
def test_rows_dequantize_as_gguf_does(type_name):
    rng = np.random.default_rng(1)
    raw = random_blocks(type_name, 24, 512, rng)
    got = blocks.rows(torch.from_numpy(raw), blocks.TYPES[type_name], torch.tensor([[3, 0], [23, 3]]), 512)
    want = as_float(raw, type_name, 512).float()
    assert got.shape == (2, 2, 512)
    assert torch.equal(got[0, 0], want[3]) and torch.equal(got[1, 0], want[23]) and torch.equal(got[0, 1], want[0])


@pytest.mark.parametrize("type_name", QUANTS)
@pytest.mark.parametrize("blocks_of", ["random", "zeros", "maxima"])
def test_each_kernel_is_the_float_product_of_its_blocks(type_name, blocks_of):
    """Against the float64 product of gguf's dequantized weights and the same int8 activations: float32
    rounding only. Against unquantized activations: within the activations' own rounding (~1%)."""
    rng = np.random.default_rng(2)
    torch.manual_seed(2)
    width = 768 if blocks.BLOCKS[type_name][1] == 32 else 512
    raw = random_blocks(type_name, 37, width, rng)
    if blocks_of == "zeros":
        raw = random_blocks(type_name, 37, width, rng, scale=0.0)
    elif blocks_of == "maxima":   # every code at its top, the largest float16 scales that keep sums finite
        raw = random_blocks(type_name, 37, width, rng, scale=60000.0 if type_name != "Q6_K" else 1000.0)
        raw[...] = np.where(np.isin(np.arange(raw.shape[1]) % blocks.BLOCKS[type_name][2],
                                    [a + i for a, _, _ in SCALES[type_name] for i in (0, 1)]), raw, 0xFF)
    w = as_float(raw, type_name, width)
    assert torch.isfinite(w).all()
    x = torch.randn(3, width)
    bias = torch.randn(37)
    y = blocks.linear(x, [torch.from_numpy(raw)], [blocks.TYPES[type_name]], bias, width, 37)
    block = 256 if "_K" in type_name else 32
    want = int8_activations(x, block) @ w.T + bias.double()
    top = float(want.abs().max()) or 1.0
    assert (y.double() - want).abs().max() <= TOLERANCE.get(type_name, 1e-5) * top
    if blocks_of == "random":   # (maxima's rows are all one number: their products cancel to tiny sums)
        plain = x.double() @ w.T + bias.double()
        assert (y.double() - plain).abs().max() <= 0.03 * float(plain.abs().max())


def test_parts_of_different_types_make_one_layer_and_nan_rows_stay_their_own():
    rng = np.random.default_rng(3)
    kinds = ["Q4_K", "Q6_K", "Q8_0", "F16"]
    raws = [random_blocks(k, n, 256, rng) for k, n in zip(kinds, (8, 5, 3, 2))]
    parts = [torch.from_numpy(r) for r in raws]
    x = torch.randn(2, 256)
    x[1, 7] = float("nan")
    y = blocks.linear(x, parts, [blocks.TYPES[k] for k in kinds], None, 256, 18)
    w = torch.cat([as_float(r, k, 256) for r, k in zip(raws, kinds)])
    assert (y[0].double() - x[0].double() @ w.T).abs().max() < 0.03 * float(y[0].abs().max())
    assert y[1].isnan().all()
    with pytest.raises(RuntimeError, match="the parts hold 18 rows; the layer has 19"):
        blocks.linear(x, parts, [blocks.TYPES[k] for k in kinds], None, 256, 19)
    with pytest.raises(RuntimeError, match="not whole blocks of 256"):
        blocks.linear(torch.randn(1, 96), parts[:1], [blocks.TYPES["Q4_K"]], None, 96, 8)


# ---- models in blocks -----------------------------------------------------------------------------------
def _in_blocks(m: Transformer, kinds) -> Transformer:
    """Every linear layer of m as GGUF blocks of the kinds given in turn (a fused layer in two parts of
    different types), and the token table Q8_0: what a mixed Q4_K_M-style file gives."""
    kinds = iter(kinds * 100)
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and name != "lm_head":
                w = child.weight.detach().numpy()
                half = w.shape[0] // 2
                a, b = next(kinds), next(kinds)
                rows = BlockRows([(a, torch.from_numpy(quantize(w[:half], Q[a]))),
                                  (b, torch.from_numpy(quantize(w[half:], Q[b])))], w.shape[1])
                setattr(parent, name, BlockLinear(rows, child.bias))
    table = m.embed.weight.detach().numpy()
    m.embed = BlockEmbedding(BlockRows([("Q8_0", torch.from_numpy(quantize(table, Q.Q8_0)))], table.shape[1]))
    m.lm_head = BlockLinear(m.embed.block_rows())
    return m.eval()


@pytest.mark.parametrize("name", ["gpt2", "qwen3", "gemma3"])
def test_a_model_in_blocks_runs_the_native_step_as_the_scripted_loop(name, monkeypatch):
    """The native step's float32 arithmetic rounds apart from torch's; an activation that lands on the other
    side of an int8 code's rounding then moves by one code (1/127 of its block's largest): agreement to 1e-2
    of the logits' range, where a wrong layer, part or position would be off by their whole size."""
    from test_cpu_step import BASE, CONFIGS, _Counted, _decode
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**BASE, **CONFIGS[name], tie_embeddings=True)).eval()
    m = _in_blocks(m, ["Q4_0", "Q8_0", "Q5_1", "Q4_1", "Q5_0"])
    plan = m._cpu_plan()
    assert plan is not None and plan.native is not None
    counted = plan.native = _Counted(plan.native)
    got = _decode(m, True, monkeypatch)
    assert counted.runs == 12
    monkeypatch.setattr(cpu_step, "_NATIVE", False)
    want = _decode(m, True, monkeypatch)
    python_loop = _decode(m, False, monkeypatch)
    assert torch.allclose(got, want, rtol=0, atol=1e-2 * float(want.abs().max()))
    assert torch.equal(want, python_loop)   # the scripted loop calls the same op: bitwise
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def _starter_gguf(tmp_path, type_name):
    """The trained starter model exported to GGUF, its 2-D weights rewritten in `type_name` by gguf-py."""
    from sol.core.formats.registry import builtin_models_dir
    ref = load_model(builtin_models_dir() / "starter")
    src = gguf_io.export_gguf(ref, tmp_path / "s.gguf", "f32")
    reader = gguf.GGUFReader(src)
    meta = gguf_io.metadata(reader)
    w = gguf.GGUFWriter(str(tmp_path / f"s-{type_name}.gguf"), meta["general.architecture"])
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        w.add_key_value(key, meta[key], kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        a = np.asarray(t.data, dtype=np.float32).reshape([int(s) for s in reversed(t.shape)])
        if a.ndim == 2 and t.name != "position_embd.weight":
            w.add_tensor(t.name, quantize(a, Q[type_name]), raw_dtype=Q[type_name])
        else:
            w.add_tensor(t.name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref, tmp_path / f"s-{type_name}.gguf"


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_1", "F16"])
def test_a_quantized_gguf_runs_in_its_own_blocks(tmp_path, type_name):
    """Loaded as it is stored (the file's bytes, mapped), agreeing with the float32 load of the same file on
    held-out text's next tokens as llama.cpp's int8 activations allow; --dtype float32 is the float path."""
    ref, path = _starter_gguf(tmp_path, type_name)
    lm = load_model(path)
    assert block_types(lm.model) == [type_name] and type(lm.model.embed) is BlockEmbedding
    assert lm.model.lm_head.part0.data_ptr() == lm.model.embed.part0.data_ptr()   # tied: one table
    f32 = load_model(path, dtype=torch.float32)
    assert block_types(f32.model) == [] and f32.model.dtype == torch.float32
    assert lm.model.num_parameters() == f32.model.num_parameters()
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[-20000:]
    ids = ref.tokenizer.encode_ids(text, add_special_tokens=False)
    ctx = ref.config.context
    rows = torch.tensor([ids[i:i + ctx] for i in range(0, len(ids) - ctx, ctx)][:24])
    with torch.no_grad():
        a, b = lm.model(rows).argmax(-1), f32.model(rows).argmax(-1)
    agree = (a == b).float().mean().item()
    assert agree >= (0.999 if type_name == "F16" else 0.98), agree
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["generate", "--model", str(path), "--prompt", "ROMEO:", "--max-tokens", "8", "--temperature", "0",
                     "--device", "cpu"]) == 0
    assert out.getvalue().strip()


# ---- damaged files: one line naming the tensor -------------------------------------------------------------
from test_gguf import _error  # noqa: E402 (sol generate on the file: one error line naming it)


def _tensor_at(path, name):
    (t,) = [t for t in gguf.GGUFReader(path).tensors if t.name == name]
    return t


def test_a_nan_scale_is_refused_at_load_naming_the_file_and_tensor(tmp_path):
    _, path = _starter_gguf(tmp_path, "Q4_0")
    t = _tensor_at(path, "blk.1.ffn_up.weight")
    data = bytearray(path.read_bytes())
    data[t.data_offset + 18 * 5: t.data_offset + 18 * 5 + 2] = np.array([np.nan], np.float16).tobytes()
    path.write_bytes(bytes(data))
    line = _error(path)
    assert "'blk.1.ffn_up.weight'" in line and "NaN or infinite scale in block 1 of row 1" in line


def test_a_truncated_block_tensor_is_one_error_naming_it(tmp_path):
    _, path = _starter_gguf(tmp_path, "Q5_1")
    last = max(gguf.GGUFReader(path).tensors, key=lambda t: t.data_offset)
    path.write_bytes(path.read_bytes()[:last.data_offset + 100])
    line = _error(path)
    assert repr(last.name) in line and "truncated" in line


def test_a_mistyped_block_tensor_is_one_error_naming_it(tmp_path):
    """A tensor whose header type does not fit its width (Q4_K's blocks of 256 for rows of 512... here 128)."""
    _, path = _starter_gguf(tmp_path, "Q4_0")
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_down.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)   # then n_dims, dims, type
    n_dims = int.from_bytes(data[at:at + 4], "little")
    kind = at + 4 + 8 * n_dims
    assert int.from_bytes(data[kind:kind + 4], "little") == int(Q.Q4_0)
    data[kind:kind + 4] = int(Q.Q4_K).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    line = _error(path)
    assert "'blk.0.ffn_down.weight'" in line, line


@pytest.mark.parametrize("type_name", QUANTS)
def test_the_interleaved_layout_holds_the_same_rows_and_products(type_name):
    """Sol's 8-row interleaved layout (blocks.group): the same bytes, every row looked up as the file's, and
    the products of the file's layout, for 1 to 6 activation rows and beside a part in the file's layout."""
    rng = np.random.default_rng(4)
    torch.manual_seed(4)
    width = 896 if blocks.BLOCKS[type_name][1] == 32 else 768
    raw, tail = random_blocks(type_name, 24, width, rng), random_blocks(type_name, 5, width, rng)
    name, grouped = blocks.group(torch.from_numpy(raw), type_name)
    assert name == "G" + type_name and grouped.shape == raw.shape and not torch.equal(grouped, torch.from_numpy(raw))
    ids = torch.tensor([0, 7, 8, 13, 23])
    assert torch.equal(blocks.rows(grouped, blocks.TYPES[name], ids, width),
                       as_float(raw, type_name, width)[ids].float())
    w = torch.cat([as_float(raw, type_name, width), as_float(tail, type_name, width)])
    for m in (1, 4, 6):
        x = torch.randn(m, width)
        y = blocks.linear(x, [grouped, torch.from_numpy(tail)], [blocks.TYPES[name], blocks.TYPES[type_name]],
                          None, width, 29)
        want = int8_activations(x, 256 if "_K" in type_name else 32) @ w.T
        assert (y.double() - want).abs().max() <= TOLERANCE.get(type_name, 1e-5) * float(want.abs().max())
    assert blocks.group(torch.from_numpy(tail), type_name)[0] == type_name   # 5 rows: not a group of 8
