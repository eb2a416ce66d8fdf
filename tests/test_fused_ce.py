"""The chunked linear + cross-entropy (common.fused_ce) against the plain path, and the model's
training forward that returns the loss alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common import fused_ce
from common.fused_ce import chunk_rows_for, cross_entropy_in_chunks, linear_cross_entropy
from common.model import GPT, GPTConfig

V, C, N = 300, 24, 70


def plain_and_chunked(dtype: torch.dtype, chunk_rows: int | None, ignore: bool = True
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Loss, d/d hidden and d/d weight of both paths on the same inputs, backward from 0.5 * loss
    (the trainer divides the loss by its accumulation steps)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, N // 2, C, generator=g, dtype=dtype)
    weight = torch.randn(V, C, generator=g, dtype=dtype) * 0.3
    targets = torch.randint(0, V, (2, N // 2), generator=g)
    if ignore:
        targets[0, ::5] = -100
    results = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if chunked:
            loss = linear_cross_entropy(h, w, targets, chunk_rows=chunk_rows)
        else:
            loss = F.cross_entropy((h @ w.t()).view(-1, V), targets.view(-1))
        (0.5 * loss).backward()
        results.append([loss.detach(), h.grad, w.grad])
    return results[0], results[1]


@pytest.mark.parametrize("chunk_rows", [1, 7, 32, N, 1000, None])
def test_loss_and_gradients_equal_the_plain_path_in_fp32(chunk_rows: int | None) -> None:
    """Chunks of one row, of a size that does not divide the rows, of all rows and more."""
    plain, chunked = plain_and_chunked(torch.float32, chunk_rows)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), plain, chunked):
        assert b.dtype == a.dtype and b.shape == a.shape, name
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_equal_in_fp64_to_rounding() -> None:
    plain, chunked = plain_and_chunked(torch.float64, 9)
    for a, b in zip(plain, chunked):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_under_bf16_autocast_like_the_plain_path() -> None:
    """Products in bf16, soft-max and loss in fp32, gradients in the inputs' dtype, as autocast
    does for the plain path; equal within bf16 rounding."""
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    grads = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (linear_cross_entropy(h, w, targets, chunk_rows=16) if chunked
                    else F.cross_entropy(h @ w.t(), targets))
        assert loss.dtype == torch.float32
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)


def test_no_gradient_wanted_gives_the_same_loss() -> None:
    plain, _ = plain_and_chunked(torch.float32, 16)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, N // 2, C, generator=g)
    weight = torch.randn(V, C, generator=g) * 0.3
    targets = torch.randint(0, V, (2, N // 2), generator=g)
    targets[0, ::5] = -100
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    torch.testing.assert_close(loss, plain[0])


def test_a_second_backward_through_the_same_call_is_refused() -> None:
    h, w = torch.randn(8, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.randint(0, V, (8,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_chunks_stay_within_the_device_budget() -> None:
    rows = chunk_rows_for(8 * 256, 50304, "cpu")
    assert rows * 50304 <= 2**23 and -(-2048 // rows) == -(-2048 * 50304 // 2**23)  # as few chunks as fit
    assert chunk_rows_for(3, 10, "cpu") == 3  # small inputs: one chunk
    assert chunk_rows_for(8192, 50304, "cuda") * 50304 <= 2**26


def test_traced_by_dynamo_without_a_graph_break() -> None:
    """torch.compile captures the chunked loss in one graph (`fullgraph=True` raises on a graph
    break); the eager backend checks the capture without compiling kernels."""
    h, w = torch.randn(20, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    targets = torch.randint(0, V, (20,))
    compiled = torch.compile(lambda a, b: linear_cross_entropy(torch.tanh(a), b, targets, chunk_rows=6),
                             backend="eager", fullgraph=True)
    compiled(h, w).backward()
    got = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    linear_cross_entropy(torch.tanh(h), w, targets, chunk_rows=6).backward()
    torch.testing.assert_close(got, (h.grad, w.grad))


# ------------------------------------------------------------------ the model

SMALL = dict(block_size=16, vocab_size=101, n_layer=2, n_head=2, n_embd=32)


def model_pair(**changes: int) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    fused = GPT(GPTConfig(**{**SMALL, **changes}, fused_ce="on"))
    plain = GPT(GPTConfig(**{**SMALL, **changes}, fused_ce="off"))
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def test_model_training_step_equal_with_and_without_the_chunked_loss() -> None:
    fused, plain = model_pair()
    idx = torch.randint(0, 101, (3, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for model in (fused, plain):
        logits, loss = model(idx, idx.roll(-1, 1))
        assert logits is None  # training: the loss alone
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_model_evaluation_returns_logits_and_loss_and_generation_the_last_position() -> None:
    fused, plain = model_pair()
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        (la, loss_a), (lb, loss_b) = fused.eval()(idx, idx), plain.eval()(idx, idx)
        last, none = fused(idx)
    assert la.shape == (2, 16, 101) and torch.equal(la, lb) and torch.equal(loss_a, loss_b)
    assert none is None
    torch.testing.assert_close(last, la[:, -1:])


def saved_for_backward(model: GPT, idx: torch.Tensor) -> list[torch.Size]:
    shapes: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return shapes


def test_training_forward_keeps_no_logits_sized_tensor_for_backward() -> None:
    """What autograd keeps between forward and backward: with the chunked path nothing of the
    (B*T, V) logits' size (the plain path keeps its log-softmax)."""
    fused, plain = model_pair(vocab_size=1000)  # logits larger than any other activation
    idx = torch.randint(0, 1000, (4, 16))
    logits_numel = 4 * 16 * fused.padded_vocab_size
    assert max(s.numel() for s in saved_for_backward(plain, idx)) >= logits_numel
    assert max(s.numel() for s in saved_for_backward(fused, idx)) < logits_numel


def test_auto_follows_the_device_list() -> None:
    model = GPT(GPTConfig(**SMALL))
    assert model.config.fused_ce == "auto" and model.uses_fused_ce(torch.device("cpu"))
    assert not GPT(GPTConfig(**SMALL, fused_ce="off")).uses_fused_ce(torch.device("cpu"))
    assert not model.uses_fused_ce(torch.device("meta"))  # not measured there: the plain path


def test_evaluation_loss_in_chunks_equals_cross_entropy() -> None:
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(3, 20, V, generator=g), torch.randint(0, V, (3, 20), generator=g)
    targets[1, :7] = -100
    expected = F.cross_entropy(logits.view(-1, V), targets.view(-1))
    for rows in (1, 13, None):
        torch.testing.assert_close(cross_entropy_in_chunks(logits, targets, chunk_rows=rows), expected)


def test_evaluation_without_gradients_keeps_no_second_logits_sized_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under no_grad the loss comes from the logits in row chunks: the largest tensor made during
    the forward is the logits themselves, not also their (B*T, V) log-softmax. (Chunks of 4 rows
    here: the default budget holds this small test's logits in one chunk.)"""
    monkeypatch.setitem(fused_ce.CHUNK_ELEMENTS, "cpu", 4 * 1024)
    _, plain = model_pair(vocab_size=1000)
    idx = torch.randint(0, 1000, (4, 16))
    storages: set[tuple[int, int]] = set()  # (address, bytes) of each tensor's memory: views share it

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            storages.update((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                            for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor))
            return out

    with torch.no_grad(), Watch():
        logits, loss = plain.eval()(idx, idx)
    logits_bytes = 4 * 16 * plain.padded_vocab_size * 4
    assert sum(1 for _, nbytes in storages if nbytes >= logits_bytes) == 1  # the logits, made once
    _, with_grad = plain(idx, idx)  # the plain F.cross_entropy over the padded vocabulary
    torch.testing.assert_close(loss, with_grad.detach())
