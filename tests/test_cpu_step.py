"""The scripted one-row CPU decode step (core/model/cpu_step.py): bitwise the Python loop's results for every
kind of model it takes, the Python loop for what it does not, and a plan that follows the model."""
import pytest
import torch
from conftest import require_int8_kernel

from sol.core.kernels import int8_kernel
from sol.core.model import cpu_step
from sol.core.model.config import ModelConfig
from sol.core.model.half import pack_half
from sol.core.model.quant import pack_model, quantize_model
from sol.core.model.transformer import Transformer

pytestmark = pytest.mark.skipif(cpu_step.scripted() is None, reason="TorchScript is not available")

BASE = dict(vocab_size=96, n_layer=2, n_head=4, d_model=64, context=64)
CONFIGS = {
    "gpt2": dict(),
    "llama_gqa": dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, n_kv_head=2),
    "qwen2_window": dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, qkv_bias=True,
                         n_kv_head=2, sliding_window=5),
    "qwen3": dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, qk_norm=True, head_dim=32),
    "gemma3": dict(norm="rmsnorm", positions="rope", mlp="geglu", bias=False, norm_plus_one=True, post_norms=True,
                   scale_embeddings=True, qk_norm=True, n_kv_head=1, sliding_window=4, rope_local_theta=10.0,
                   layer_types=["sliding_attention", "full_attention"], attn_scale=0.2),
    "phi_partial_rope": dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, rope_dim=8),
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**BASE, **CONFIGS[name])).eval()
    with torch.no_grad():
        for p in m.parameters():   # norms away from 1 and 0, so a wrong norm shows
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _int8_path(weights, monkeypatch):
    """"int8": Sol's kernel (skipped where this machine cannot build it); "int8-fbgemm", "int8-reduced":
    fbgemm, the second in its 7-bit three-row codes (CPUs without VNNI), on every CPU."""
    if weights == "int8":
        require_int8_kernel()
        monkeypatch.setattr(cpu_step, "_NATIVE", False)   # the scripted loop; the native step is tested below
        return cpu_step.LIN_INT8_KERNEL
    monkeypatch.setattr(int8_kernel, "_ENABLED", False)
    if weights == "int8-reduced":
        from sol.core.model import quant
        monkeypatch.setattr(quant, "_CODES", quant.REDUCED_CODES)
    return cpu_step.LIN_INT8


def _decode(m, scripted: bool, monkeypatch, steps=12):
    """Logits of a prompt then `steps` tokens decoded one at a time (the CPU's eager one-row step)."""
    with monkeypatch.context() as mp:
        if not scripted:
            mp.setattr(Transformer, "_cpu_plan", lambda self: None)
        cache = m.new_cache(1, 32)
        out = []
        with torch.inference_mode():
            m(torch.tensor([[3, 1, 4, 1, 5]]), cache)
            for j in range(steps):
                p = 5 + j
                out.append(m.logits(m.decode(torch.tensor([[(7 * j) % 90]]), torch.tensor([p]), cache, p)))
        return torch.cat(out)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("weights", ["float32", "float16", "int8", "int8-fbgemm", "int8-reduced"])
def test_the_scripted_step_is_bitwise_the_python_loop(name, weights, monkeypatch):
    m = _model(name)
    kind = _int8_path(weights, monkeypatch) if weights.startswith("int8") else None
    if weights == "float16":
        pack_half(m.half())      # fbgemm's packed float16 product (core/model/half.py)
    elif weights.startswith("int8"):
        quantize_model(m)
        for mod in m.modules():  # 64 inputs: fbgemm would pad them, so force the packed path
            if hasattr(mod, "pack") and hasattr(mod, "scales"):
                mod.pack(force=True)
    want = _decode(m, False, monkeypatch)
    got = _decode(m, True, monkeypatch)
    assert m._cpu_plan() is not None
    assert torch.equal(got, want)
    if kind is not None:
        assert set(m._cpu_plan().args["kind"]) == {kind}


def test_narrow_int8_layers_dequantize_in_the_scripted_step_too(monkeypatch):
    monkeypatch.setattr(int8_kernel, "_ENABLED", False)   # the kernel takes every width; fbgemm does not
    m = quantize_model(_model("gpt2"))
    pack_model(m)   # 64 and 256 inputs: left unpacked, dequantized on the fly
    assert torch.equal(_decode(m, True, monkeypatch), _decode(m, False, monkeypatch))
    assert m._cpu_plan() is not None


def test_what_the_scripted_step_does_not_take_keeps_the_python_loop(monkeypatch):
    capped = Transformer(ModelConfig(**BASE, **CONFIGS["llama_gqa"], attn_softcap=30.0)).eval()
    assert type(cpu_step.build(capped)) is cpu_step.Refusal and capped._cpu_plan() is None
    m = _model("gpt2")
    calls = []
    handle = m.blocks[1].mlp.fc.register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
    _decode(m, True, monkeypatch, steps=3)
    assert len(calls) == 3 + 1   # the prompt, then every decoded token went through the module
    handle.remove()
    calls.clear()
    _decode(m, True, monkeypatch, steps=3)
    assert len(calls) == 0 and m._cpu_plan() is not None   # without the hook: scripted again


def test_the_plan_follows_the_model(monkeypatch):
    m = _model("llama_gqa")
    builds = []
    real = cpu_step.build
    monkeypatch.setattr(cpu_step, "build", lambda model: builds.append(1) or real(model))
    checks = []
    real_valid = cpu_step.Plan.valid
    monkeypatch.setattr(cpu_step.Plan, "valid", lambda self: checks.append(1) or real_valid(self))
    before = _decode(m, True, monkeypatch)
    # Built once; not checked again token after token while no module anywhere changes (core/model/changes.py).
    assert len(builds) == 1 and len(checks) <= 1
    with torch.no_grad():
        m.blocks[0].attn.proj.weight = torch.nn.Parameter(m.blocks[0].attn.proj.weight * 2)
    after = _decode(m, True, monkeypatch)
    assert len(builds) == 2 and not torch.equal(before, after)
    assert torch.equal(after, _decode(m, False, monkeypatch))
    m.blocks[1].mlp.fc = torch.nn.Linear(64, m.blocks[1].mlp.fc.out_features, bias=False)
    assert torch.equal(_decode(m, True, monkeypatch), _decode(m, False, monkeypatch)) and len(builds) == 3
    m.to(torch.float64)   # any move or cast drops the plan
    assert m.__dict__["_plan"] is None


@pytest.mark.parametrize("name", ["gpt2", "qwen2_window", "gemma3"])
@pytest.mark.parametrize("weights", ["float32", "int8", "int8-fbgemm"])
def test_several_rows_at_their_own_positions_too(name, weights, monkeypatch):
    """The batched step (rows at different positions, the whole cache under each row's mask) is also
    bitwise the Python loop's, one row included (the static step a GPU captures, run on the CPU)."""
    m = _model(name)
    if weights.startswith("int8"):
        _int8_path(weights, monkeypatch)
        quantize_model(m)
        pack_model(m)
    results = []
    for scripted in (False, True):
        with monkeypatch.context() as mp:
            if not scripted:
                mp.setattr(Transformer, "_cpu_plan", lambda self: None)
            cache = m.new_cache(3, 32)
            cache.reserve(32)
            out = []
            with torch.inference_mode():
                for b, n in enumerate((5, 9, 2)):   # three prompts of different lengths, each in its row
                    m(torch.arange(1, n + 1).view(1, n), cache.rows(b, b + 1))
                pos = torch.tensor([5, 9, 2])
                for j in range(8):
                    idx = torch.tensor([[(3 * j + b) % 90] for b in range(3)])
                    out.append(m.logits(m.decode(idx, pos + j, cache)))
                    out.append(m.logits(m.decode(idx[:1], pos[:1] + j + 15, cache)))   # one row, no `at`
            results.append(torch.cat([o.flatten() for o in out]))
    assert m._cpu_plan() is not None
    assert torch.equal(results[0], results[1])


def test_a_refusal_is_looked_at_again_after_a_change(monkeypatch):
    """A cast unpacks float16 layers (the plan is dropped and refused: nothing packed to hand over); the
    Python loop's first forward packs them again, and from the next token on the scripted step runs."""
    m = _model("gpt2")
    pack_half(m.half())
    m.to(torch.float16)   # HalfLinear unpacks on any move or cast
    assert m.blocks[0].attn.qkv._packed is None and m._cpu_plan() is None   # refused: nothing packed
    assert type(m.__dict__["_plan"]) is cpu_step.Refusal
    got = _decode(m, True, monkeypatch)
    assert m.blocks[0].attn.qkv._packed is not None and m._cpu_plan() is not None
    assert torch.equal(got, _decode(m, False, monkeypatch))


# ---- the native one-row step (int8_step.cpp): every linear layer in Sol's int8 kernel ----------------------
class _Counted:
    """Stands for a plan's native step and counts its runs."""

    def __init__(self, step):
        self.step, self.runs = step, 0

    def run(self, *args):
        self.runs += 1
        return self.step.run(*args)


def _int8_model(name):
    require_int8_kernel()
    m = quantize_model(_model(name))
    pack_model(m)
    return m


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_native_step_gives_the_scripted_loops_logits(name, monkeypatch):
    """Every kind of model the plan takes: norms (layer, RMS, RMS + 1, q/k, post), GQA, sliding windows,
    partial RoPE, GELU, SwiGLU and GeGLU. Its float32 arithmetic rounds differently from torch's operations,
    and the kernel's activation codes can then round one step apart: agreement to 1e-3 of the logits' range,
    not bitwise; a wrong sign, norm or position would be off by the logits' own size."""
    m = _int8_model(name)
    plan = m._cpu_plan()
    assert plan.native is not None
    counted = plan.native = _Counted(plan.native)
    got = _decode(m, True, monkeypatch)
    assert counted.runs == 12
    monkeypatch.setattr(cpu_step, "_NATIVE", False)
    want = _decode(m, True, monkeypatch)
    assert counted.runs == 12   # the scripted loop this time
    assert torch.allclose(got, want, rtol=0, atol=1e-3 * float(want.abs().max()))
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_the_native_step_writes_the_cache_as_the_scripted_loop_does(monkeypatch):
    m = _int8_model("qwen2_window")
    caches = []
    for native in (True, False):
        monkeypatch.setattr(cpu_step, "_NATIVE", native)
        cache = m.new_cache(1, 32)
        with torch.inference_mode():
            m(torch.tensor([[3, 1, 4, 1, 5]]), cache)
            for p in range(5, 9):
                m.decode(torch.tensor([[p + 10]]), torch.tensor([p]), cache, p)
        caches.append(cache)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        assert torch.allclose(a, b, rtol=0, atol=1e-3 * float(b.abs().max()))
        assert a[:, :, 9:].abs().max() == 0   # nothing written past the last position


def test_only_models_wholly_in_the_kernel_get_the_native_step(monkeypatch):
    assert _model("gpt2")._cpu_plan().native is None   # float32
    m = quantize_model(_model("gpt2"))
    m.blocks[1].mlp.fc = torch.nn.Linear(64, m.blocks[1].mlp.fc.out_features)   # one float layer
    pack_model(m)
    assert m._cpu_plan() is not None and m._cpu_plan().native is None
    monkeypatch.setattr(int8_kernel, "_ENABLED", False)
    m = quantize_model(_model("gpt2"))
    pack_model(m)   # fbgemm
    assert m._cpu_plan() is not None and m._cpu_plan().native is None


def test_the_native_step_refuses_what_it_cannot_hold_and_spreads_nan():
    m = _int8_model("gpt2")
    step = m._cpu_plan().native
    cache = m.new_cache(1, 8)
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="cache does not hold position 8"):
            step.run(x, 8, cache.k, cache.v, [], [])
        with pytest.raises(RuntimeError, match="64 contiguous float32"):
            step.run(torch.randn(1, 1, 65), 0, cache.k, cache.v, [], [])
        x[0, 0, 5] = float("nan")
        assert step.run(x, 0, cache.k, cache.v, [], []).isnan().all()
