"""CLIP InfoNCE (plain and tiled) and SigLIP against open_clip and naive float64 references."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from mmpretrain.losses import clip_loss, siglip_loss
from mmpretrain.losses.tiled import tiled_info_nce

F64 = torch.float64


def _features(n: int, d: int, seed: int, norm: float | None = 1.0, dtype=F64) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return (F.normalize(x, dim=1) * norm if norm else x).requires_grad_()


def _scale(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F64, requires_grad=True)


def _naive_one_way(q, k, s, offset=0):
    logits = s * q @ k.T
    return F.cross_entropy(logits, torch.arange(len(q)) + offset)


def _naive_clip(img, txt, s):
    return (_naive_one_way(img, txt, s) + _naive_one_way(txt, img, s)) / 2


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def _assert_same(got, want, tol=1e-10):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("batch", [1, 7, 37])
@pytest.mark.parametrize("tile_size", [None, 8])
@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_equals_open_clip_and_naive(batch, tile_size, local_loss):
    img, txt, s = _features(batch, 6, 1), _features(batch, 6, 2), _scale(14.3)
    ref = ClipLoss()(img, txt, s)
    out = clip_loss(img, txt, s, local_loss=local_loss, tile_size=tile_size)
    _assert_same([out["loss"]], [ref])
    _assert_same([out["loss"]], [_naive_clip(img, txt, s)])
    _assert_same(_grads(out["loss"], (img, txt, s)), _grads(ref, (img, txt, s)))
    assert out["logit_scale"].item() == pytest.approx(14.3) and not out["logit_scale"].requires_grad
    assert not out["acc_i2t"].requires_grad and not out["acc_t2i"].requires_grad


@pytest.mark.parametrize("tile_size", [None, 1, 3, 100])
@pytest.mark.parametrize("local_loss", [False, True])
def test_accuracy_on_a_hand_made_matrix(tile_size, local_loss):
    # images = identity, so the logits are s·M: rows are image → text, columns text → image.
    m = torch.tensor([[3, 3, 0, 0],   # tie with a later column: argmax is the first, the positive ✓
                      [2, 1, 0, 0],   # ✗
                      [0, 5, 4, 0],   # ✗
                      [0, 0, 0, 0]],  # ✗ (argmax of a constant row is 0)
                     dtype=F64)
    out = clip_loss(torch.eye(4, dtype=F64), m.T.clone(), 2.0, local_loss=local_loss, tile_size=tile_size)
    assert out["acc_i2t"].item() == 1 / 4
    assert out["acc_t2i"].item() == 2 / 4  # columns 0 ✓, 1 ✗ (5 in row 2), 2 ✓, 3 ✗ (tie, first wins)


@pytest.mark.parametrize(
    "batch, tile, scale, norm",
    [(37, 8, 14.3, 1.0), (5, 64, 14.3, 1.0), (37, 8, 100.0, 3.0), (16, 16, 100.0, None), (33, 1, 2.0, 1.0)],
)
def test_tiled_equals_naive_with_gradients(batch, tile, scale, norm):
    img, txt, s = _features(batch, 8, 3, norm), _features(batch, 8, 4, norm), _scale(scale)
    out = clip_loss(img, txt, s, tile_size=tile)
    ref = _naive_clip(img, txt, s)
    _assert_same([out["loss"]], [ref])
    _assert_same(_grads(out["loss"], (img, txt, s)), _grads(ref, (img, txt, s)))


@pytest.mark.parametrize("n, m, offset, tile", [(5, 13, 4, 3), (5, 13, 8, 4), (13, 13, 0, 5), (6, 40, 17, 7)])
def test_tiled_one_way_with_unequal_counts_and_offset(n, m, offset, tile):
    q, k, s = _features(n, 4, 5, 2.0), _features(m, 4, 6, 2.0), _scale(30.0)
    loss, acc, acc_cols = tiled_info_nce(q, k, s, tile_size=tile, offset=offset)
    logits = s * q @ k.T
    target = torch.arange(n) + offset
    ref = F.cross_entropy(logits, target)
    _assert_same([loss], [ref])
    _assert_same(_grads(loss, (q, k, s)), _grads(ref, (q, k, s)))
    assert acc.item() == (logits.argmax(1) == target).double().mean().item()
    assert acc_cols.isnan()


@pytest.mark.parametrize("tile", [1, 2, 3, 7, 50])
def test_tiled_accuracy_follows_argmax_on_ties(tile):
    # entries in {-1, 0, 1} and d = 3: many exact ties, duplicated rows, positives on tile edges
    g = torch.Generator().manual_seed(tile)
    q, k = (torch.randint(-1, 2, (n, 3), generator=g).to(F64) for n in (9, 20))
    for offset in (0, 5, 11):
        _, acc, _ = tiled_info_nce(q, k, torch.tensor(1.0, dtype=F64), tile_size=tile, offset=offset)
        want = (torch.argmax(q @ k.T, 1) == torch.arange(9) + offset).double().mean()
        assert acc.item() == want.item(), offset
    sq = k[:9]
    _, acc_rows, acc_cols = tiled_info_nce(q, sq, torch.tensor(1.0, dtype=F64), tile_size=tile, symmetric=True)
    assert acc_rows.item() == (torch.argmax(q @ sq.T, 1) == torch.arange(9)).double().mean().item()
    assert acc_cols.item() == (torch.argmax(q @ sq.T, 0) == torch.arange(9)).double().mean().item()


def test_tiled_gradcheck():
    q, k, s = _features(4, 3, 7, None), _features(6, 3, 8, None), _scale(1.7)
    assert torch.autograd.gradcheck(lambda a, b, c: tiled_info_nce(a, b, c, tile_size=2, offset=1)[0], (q, k, s))
    q5, k5 = _features(5, 3, 9, None), _features(5, 3, 10, None)
    assert torch.autograd.gradcheck(lambda a, b, c: tiled_info_nce(a, b, c, tile_size=2, symmetric=True)[0],
                                    (q5, k5, s))


@pytest.mark.parametrize("local_loss", [False, True])
def test_tiled_never_builds_the_full_matrix(local_loss, largest_output):
    batch, tile, dim = 512, 32, 16
    img, txt, s = _features(batch, dim, 11, dtype=torch.float32), _features(batch, dim, 12, dtype=torch.float32), _scale(50.0)
    with largest_output() as plain:
        clip_loss(img, txt, s, local_loss=local_loss)["loss"].backward()
    assert plain.numel == batch * batch  # the recorder does see a B×B when there is one
    with largest_output() as tiled:
        clip_loss(img, txt, s, local_loss=local_loss, tile_size=tile)["loss"].backward()
    assert tiled.numel <= max(batch * dim, tile * tile, batch), tiled.op


def test_half_precision_features_use_float32():
    img, txt = _features(24, 8, 13, dtype=torch.float32), _features(24, 8, 14, dtype=torch.float32)
    ref = clip_loss(img.bfloat16().double(), txt.bfloat16().double(), 20.0)["loss"]
    for tile in (None, 5):
        out = clip_loss(img.bfloat16(), txt.bfloat16(), torch.tensor(20.0), tile_size=tile)
        assert out["loss"].dtype == torch.float32
        assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_misuse_is_a_value_error():
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="one shape"):
        clip_loss(a, b, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        siglip_loss(a, b, 1.0, 0.0)
    with pytest.raises(ValueError, match="tile_size"):
        clip_loss(a, a, 1.0, tile_size=0)
    with pytest.raises(ValueError, match="scalar"):
        clip_loss(a, a, torch.ones(2))
    with pytest.raises(ValueError, match="positives"):
        tiled_info_nce(a, b, torch.tensor(1.0), tile_size=2, offset=2)


@pytest.mark.parametrize("batch", [1, 6, 19])
def test_siglip_equals_open_clip(batch):
    img, txt = _features(batch, 5, 15), _features(batch, 5, 16)
    s, b = _scale(10.0), torch.tensor(-10.0, dtype=F64, requires_grad=True)
    ref = SigLipLoss()(img, txt, s, b)
    out = siglip_loss(img, txt, s, b)
    _assert_same([out["loss"]], [ref])
    _assert_same(_grads(out["loss"], (img, txt, s, b)), _grads(ref, (img, txt, s, b)))
    prob = torch.sigmoid(s * img @ txt.T + b).detach()
    eye = torch.eye(batch, dtype=torch.bool)
    assert out["pos_prob"].item() == pytest.approx(prob[eye].mean().item())
    assert out["neg_prob"].item() == pytest.approx(prob[~eye].mean().item() if batch > 1 else 0.0)
    assert not out["pos_prob"].requires_grad
