"""core/kernels/pick.py: the greedy token and log-sum-exp of a row of logits, natively where Sol's library is loaded,
with torch's answers (edge cases included) either way."""
import math

import pytest
import torch
from conftest import require_int8_kernel

from sol.core.kernels import int8_kernel, pick


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    if request.param == "native":
        require_int8_kernel()
        assert int8_kernel.available() and int8_kernel.loaded()
    else:
        monkeypatch.setattr(int8_kernel, "loaded", lambda: False)
    return request.param


def _rows():
    torch.manual_seed(0)
    rows = [torch.randn(n) * 4 for n in (1, 7, 8, 9, 17, 50257)]
    tie = torch.randn(50)
    tie[[3, 20, 41]] = 9.0           # the first of equal largest values
    late = torch.randn(50257)
    late[50256] = 50.0                # the largest in the scalar tail
    padded = torch.randn(1000)
    padded[900:] = float("-inf")      # a padded vocabulary
    big = torch.randn(64) * 1e4       # exp would overflow without the shift
    return rows + [tie, late, padded, big, torch.full((9,), -3.0)]


def test_the_same_greedy_token_and_log_sum_exp_as_torch(path):
    for x in _rows():
        assert pick.argmax(x) == int(x.argmax())
        want = float(x.double().logsumexp(-1))
        assert math.isclose(pick.logsumexp(x), want, rel_tol=1e-6, abs_tol=1e-6), (x.numel(), want)


@pytest.mark.parametrize("values, arg, lse", [
    ([1.0, float("nan"), 5.0, float("nan")], 1, float("nan")),   # torch: a NaN is the largest
    ([1.0, float("inf"), 2.0], 1, float("inf")),
    ([float("-inf")] * 11, 0, float("-inf")),
    ([-1.0] * 10 + [float("nan")], 10, float("nan")),            # the NaN in the scalar tail
])
def test_nan_and_infinities_as_torch_gives_them(path, values, arg, lse):
    x = torch.tensor(values)
    assert pick.argmax(x) == arg == int(x.argmax())
    got, want = pick.logsumexp(x), float(x.logsumexp(-1))
    assert (math.isnan(got) and math.isnan(want)) or got == want == lse


def test_what_the_library_does_not_take_goes_to_torch(monkeypatch):
    require_int8_kernel()
    assert int8_kernel.available()
    calls = []
    monkeypatch.setattr(torch.Tensor, "argmax", lambda self, *a: calls.append(1) or torch.tensor(2))
    for x in (torch.randn(4, dtype=torch.float64), torch.randn(8)[::2], torch.randn(2, 3)):
        assert pick.argmax(x) == 2
    assert len(calls) == 3


def test_infinities_and_nans_take_torchs_answers(path):
    inf, nan = float("inf"), float("nan")
    for x in (torch.full((5,), -inf), torch.tensor([1.0, inf, 2.0]), torch.tensor([1.0, nan, 2.0]),
              torch.tensor([-inf, 3.0, -inf])):
        got, want = pick.logsumexp(x), float(x.logsumexp(-1))
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want), (x, got, want)
