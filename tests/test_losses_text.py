"""Chunked token cross-entropy against the unchunked F.cross_entropy, in float64."""

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.losses import token_loss

F64 = torch.float64
VOCAB, DIM = 11, 5


def _inputs(shape=(3, 9), ignore=0.4, seed=0, dtype=F64, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, DIM, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(VOCAB, DIM, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(VOCAB, generator=g, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, VOCAB, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore] = -100
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels):
    logits = hidden @ weight.T + (0 if bias is None else bias)  # (..., V)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))  # mean over labels != -100
    keep = labels != -100
    accuracy = (logits.argmax(-1)[keep] == labels[keep]).double().mean()
    return loss, accuracy, int(keep.sum())


def _params(hidden, weight, bias):
    return [t for t in (hidden, weight, bias) if t is not None]


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 16, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_equals_unchunked(chunk_size, bias):
    hidden, weight, b, labels = _inputs(bias=bias)
    loss, accuracy, count = _reference(hidden, weight, b, labels)
    assert 5 < count < labels.numel()  # both predicted and ignored positions
    out = token_loss(hidden, weight, labels, bias=b, chunk_size=chunk_size)
    torch.testing.assert_close(out["loss"], loss, rtol=1e-12, atol=1e-12)
    assert out["accuracy"].item() == pytest.approx(accuracy.item())
    assert out["tokens"].item() == count
    params = _params(hidden, weight, b)
    got, want = torch.autograd.grad(out["loss"], params), torch.autograd.grad(loss, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert not out["accuracy"].requires_grad and not out["tokens"].requires_grad


@pytest.mark.parametrize("chunk_size", [3, 1000])
def test_accuracy_follows_argmax_ties_included(chunk_size):
    """Counted as argmax == label, argmax's first-index rule deciding ties: a label tied with an
    earlier maximum is wrong, one that is the first maximum is right, right labels in every row too."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(VOCAB, DIM, generator=g, dtype=F64)
    weight[7] = weight[3]  # tokens 3 and 7 always have equal logits
    hidden = 4 * weight[3] + 0.01 * torch.randn(12, DIM, generator=g, dtype=F64)  # 3 and 7 the maximum
    logits = hidden @ weight.T
    assert (logits.argmax(1) == 3).all() and torch.equal(logits[:, 3], logits[:, 7])
    labels = torch.tensor([3] * 5 + [7] * 4 + [0] * 3)
    out = token_loss(hidden, weight, labels, chunk_size=chunk_size)
    assert out["accuracy"].item() == pytest.approx(5 / 12)
    right = token_loss(hidden, weight, logits.argmax(1), chunk_size=chunk_size)
    assert right["accuracy"].item() == 1.0
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, labels), rtol=1e-12, atol=1e-12)


def test_num_tokens_sets_the_denominator():
    hidden, weight, b, labels = _inputs()
    loss, _, count = _reference(hidden, weight, b, labels)
    want = torch.autograd.grad(loss / 3, hidden, retain_graph=True)[0]
    for num_tokens in (3 * count, torch.tensor(3 * count)):
        out = token_loss(hidden, weight, labels, bias=b, chunk_size=4, num_tokens=num_tokens)
        torch.testing.assert_close(out["loss"], loss / 3, rtol=1e-12, atol=1e-12)
        assert out["tokens"].item() == 3 * count
        hidden.grad = None
        out["loss"].backward()
        torch.testing.assert_close(hidden.grad, want, rtol=1e-12, atol=1e-12)


def test_no_predicted_tokens_is_a_connected_zero():
    hidden, weight, b, labels = _inputs(ignore=1.0)
    out = token_loss(hidden, weight, labels, bias=b)
    assert out["loss"].item() == 0 and out["accuracy"].item() == 0 and out["tokens"].item() == 0
    out["loss"].backward()  # still part of the graph: every parameter gets a (zero) gradient
    for t in (hidden, weight, b):
        assert t.grad is not None and not t.grad.any()


def test_only_chunk_by_vocab_logits_exist(largest_output):
    n, vocab, dim, chunk = 1024, 256, 8, 32
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, dim, generator=g, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g, requires_grad=True)
    bias = torch.zeros(vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    with largest_output() as rec:
        token_loss(hidden, weight, labels, bias=bias, chunk_size=chunk)["loss"].backward()
    assert rec.numel <= max(chunk * vocab, n * dim, vocab * dim) < n * vocab, rec.op


def test_bf16_inputs_compute_in_float32():
    hidden, weight, b, labels = _inputs(shape=(4, 16), dtype=torch.bfloat16)
    out = token_loss(hidden, weight, labels, bias=b, chunk_size=5)
    assert out["loss"].dtype == torch.float32
    ref, _, _ = _reference(hidden.double(), weight.double(), b.double(), labels)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    out["loss"].backward()
    assert hidden.grad.dtype == weight.grad.dtype == b.grad.dtype == torch.bfloat16


def test_no_grad_mode_gives_the_value():
    hidden, weight, b, labels = _inputs()
    with torch.no_grad():
        out = token_loss(hidden, weight, labels, bias=b, chunk_size=3)
    assert out["loss"].item() == pytest.approx(_reference(hidden, weight, b, labels)[0].item())
    assert not out["loss"].requires_grad


def test_misuse_is_a_value_error():
    hidden, weight, b, labels = _inputs()
    with pytest.raises(ValueError, match="labels"):
        token_loss(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="weight"):
        token_loss(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="bias"):
        token_loss(hidden, weight, labels, bias=b[:-1])
    bad = labels.clone()
    bad[0, 0] = VOCAB
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        token_loss(hidden, weight, bad)
