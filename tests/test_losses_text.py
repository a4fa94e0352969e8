"""Chunked token cross-entropy against the unchunked F.cross_entropy, in float64."""

import math

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
    for fraction in (0, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            token_loss(hidden, weight, labels, fraction=fraction)
    for positions in (torch.tensor([0, 0]), torch.tensor([], dtype=torch.long), torch.arange(100)):
        with pytest.raises(ValueError, match="distinct indices"):
            token_loss(hidden, weight, labels, positions=positions)


# ------------------------------------------------------------------ the position-subset estimator
@pytest.mark.parametrize("k", [1, 2, 4])
def test_every_position_subset_averages_to_the_exact_loss_and_gradient(k):
    """The estimator's expectation, taken exactly: every k-subset of the N positions is equally likely
    (test_sample_positions_draws_every_subset_alike), so the mean over all C(N, k) subsets of the
    decoded loss and its gradients (hidden, tied weight, bias) is the expected value; it equals the
    exact loss and gradient, with and without a window's count (num_tokens)."""
    import itertools

    hidden, weight, b, labels = _inputs(shape=(2, 4), ignore=0.3, seed=1)
    n = int((labels != -100).sum())
    assert n == 6
    params = _params(hidden, weight, b)
    for num_tokens in (None, 3 * n):
        exact = token_loss(hidden, weight, labels, bias=b, chunk_size=2, num_tokens=num_tokens)
        want = torch.autograd.grad(exact["loss"], params)
        subsets = list(itertools.combinations(range(n), k))
        losses, grads = [], [torch.zeros_like(t) for t in params]
        for subset in subsets:
            out = token_loss(hidden, weight, labels, bias=b, chunk_size=2, num_tokens=num_tokens,
                             positions=torch.tensor(subset))
            assert out["tokens"].item() == (num_tokens or n)  # every predicted token counts, decoded or not
            losses.append(out["loss"])
            for acc, g in zip(grads, torch.autograd.grad(out["loss"], params)):
                acc += g / len(subsets)
        torch.testing.assert_close(torch.stack(losses).mean(), exact["loss"], rtol=1e-12, atol=1e-12)
        for got, w in zip(grads, want):
            torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)
        if k < n:  # one subset alone is not the exact loss: the estimator has variance
            assert (torch.stack(losses) - exact["loss"]).abs().max() > 1e-3


def test_sample_positions_draws_every_subset_alike():
    import math
    from collections import Counter

    from mmpretrain.losses.text import sample_positions

    n, fraction, draws = 7, 0.3, 7000
    k = math.ceil(fraction * n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        picks = [tuple(sample_positions(n, fraction).tolist()) for _ in range(draws)]
    assert all(len(p) == k == 3 and list(p) == sorted(set(p)) and 0 <= p[0] and p[-1] < n for p in picks)
    seen = Counter(picks)
    assert len(seen) == math.comb(n, k) == 35  # every subset occurs
    expected = draws / 35  # 200 each; a count's sd is about 14
    assert max(abs(c - expected) for c in seen.values()) < 60, seen.most_common(3)
    assert sample_positions(5, 1e-9).numel() == 1 and sample_positions(5, 1.0).numel() == 5


def test_fraction_decodes_a_share_of_the_positions_drawn_from_torchs_generator():
    from mmpretrain.losses.text import sample_positions

    hidden, weight, b, labels = _inputs(shape=(4, 16), ignore=0.2, seed=5)
    n = int((labels != -100).sum())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        drawn = token_loss(hidden, weight, labels, bias=b, fraction=0.25)
        torch.manual_seed(7)
        positions = sample_positions(n, 0.25)
    named = token_loss(hidden, weight, labels, bias=b, positions=positions)
    assert positions.numel() == math.ceil(0.25 * n) < n
    torch.testing.assert_close(drawn["loss"], named["loss"], rtol=0, atol=0)
    assert drawn["tokens"].item() == n
    logits = hidden[labels != -100][positions] @ weight.T + b
    decoded_right = (logits.argmax(1) == labels[labels != -100][positions]).double().mean()
    assert drawn["accuracy"].item() == pytest.approx(decoded_right.item())  # over the decoded tokens
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        full = token_loss(hidden, weight, labels, bias=b, fraction=1.0)
        after = torch.rand(())
        torch.manual_seed(7)
        untouched = torch.rand(())
    torch.testing.assert_close(full["loss"], _reference(hidden, weight, b, labels)[0], rtol=1e-12, atol=1e-12)
    assert after == untouched  # the exact loss draws nothing


@pytest.mark.parametrize("chunk_size", [3, 1000])
@pytest.mark.parametrize("outer", [1.0, 2.5])
def test_joint_decode_equals_each_loss_alone_weighted(chunk_size, outer):
    """token_losses over an MLM-like part (bias, every position) and an AR-like one (no bias, a named
    subset of positions, a given global count): the differentiable sum is Σ weight × token_loss of
    each part alone, its gradients (hidden, bias, the shared weight) the same weighted sum, and each
    part's logged loss, accuracy and token count equal its own call's; `outer` scales the result
    after the decode (the backward's multiplication path)."""
    from mmpretrain.losses.text import TokenTargets, token_losses

    h_mlm, weight, bias, y_mlm = _inputs(shape=(3, 9), seed=1)
    g = torch.Generator().manual_seed(2)
    h_ar = torch.randn(4, 7, DIM, generator=g, dtype=F64).requires_grad_()
    y_ar = torch.randint(0, VOCAB, (4, 7), generator=g)
    y_ar[:, -2:] = -100
    positions = torch.tensor([0, 3, 4, 9, 17])
    kw_mlm, kw_ar = {"bias": bias}, {"positions": positions, "num_tokens": 30}
    joint, parts = token_losses(weight, {
        "mlm": TokenTargets(h_mlm, y_mlm, weight=0.7, **kw_mlm),
        "ar": TokenTargets(h_ar, y_ar, weight=1.9, **kw_ar)}, chunk_size=chunk_size)
    (outer * joint).backward()
    got = [t.grad.clone() for t in (h_mlm, h_ar, weight, bias)]
    for t in (h_mlm, h_ar, weight, bias):
        t.grad = None
    mlm = token_loss(h_mlm, weight, y_mlm, chunk_size=chunk_size, **kw_mlm)
    ar = token_loss(h_ar, weight, y_ar, chunk_size=chunk_size, **kw_ar)
    (outer * (0.7 * mlm["loss"] + 1.9 * ar["loss"])).backward()
    expected = [t.grad for t in (h_mlm, h_ar, weight, bias)]
    torch.testing.assert_close(joint, 0.7 * mlm["loss"] + 1.9 * ar["loss"], rtol=1e-12, atol=1e-12)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for name, alone in (("mlm", mlm), ("ar", ar)):
        assert not parts[name]["loss"].requires_grad
        for key in ("loss", "accuracy", "tokens"):
            torch.testing.assert_close(parts[name][key], alone[key].detach(), rtol=1e-12, atol=1e-12)
    assert float(parts["ar"]["tokens"]) == 30.0 and float(parts["mlm"]["tokens"]) == int((y_mlm != -100).sum())
    # and the single loss is still the unchunked reference
    loss, _, _ = _reference(h_mlm, weight, bias, y_mlm)
    torch.testing.assert_close(mlm["loss"], loss, rtol=1e-12, atol=1e-12)
