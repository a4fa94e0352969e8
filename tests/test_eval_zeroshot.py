"""Zero-shot classification on constructed cases with known answers, prompt ensembling against a
per-class loop, class-name/template files; and the streaming text metrics (MLM accuracy, AR
perplexity) against whole-set references."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.errors import UserError
from mmpretrain.eval.templates import DEFAULT_TEMPLATES
from mmpretrain.eval.text_metrics import TextMetrics, ar_counts, mlm_counts
from mmpretrain.eval.zeroshot import class_embeddings, classification_metrics, load_classnames, load_templates


def _one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


# -- classification --------------------------------------------------------------------------------
def _known_case():
    """8 one-hot classes, class 7 without samples. 14 images sit exactly on their class; two of class 1
    lean to class 3 (top-1 wrong, top-5 right); one of class 0 sits between classes 2..6 (a five-way
    tie, which the tie rule gives to class 2; its true class ranks 6th, outside the top 5)."""
    e = torch.eye(8, dtype=torch.float64)
    images, labels = [], []
    for c in range(7):
        images += [e[c], e[c]]
        labels += [c, c]
    images += [2 * e[3] + e[1], 2 * e[3] + e[1], 2 * e[2:7].sum(0) + e[0]]
    labels += [1, 1, 0]
    return torch.stack(images), e, torch.tensor(labels)


def test_known_answer():
    images, classes, labels = _known_case()
    m = classification_metrics(images, classes, labels, chunk_size=4)
    assert m["acc1"] == pytest.approx(14 / 17) and m["acc5"] == pytest.approx(16 / 17)
    assert m["per_class_recall"][:7] == pytest.approx([2 / 3, 1 / 2, 1, 1, 1, 1, 1])
    assert m["per_class_recall"][7] is None
    assert m["per_class_count"] == [3, 4, 2, 2, 2, 2, 2, 0]
    assert m["mean_per_class_recall"] == pytest.approx((2 / 3 + 1 / 2 + 5) / 7)  # class 7 has no samples
    assert m["confusions"] == [{"true": 1, "predicted": 3, "count": 2},
                               {"true": 0, "predicted": 2, "count": 1}]
    assert (m["num_samples"], m["num_classes"]) == (17, 8)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunk_size_and_order_change_nothing(chunk):
    images, classes, labels = _known_case()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    base = classification_metrics(images, classes, labels)
    assert classification_metrics(images[perm], classes, labels[perm], chunk_size=chunk) == base


def test_no_top5_below_five_classes_and_confusion_limit():
    images, classes, labels = _known_case()
    keep = labels < 4
    m = classification_metrics(images[keep][:, :4], classes[:4, :4], labels[keep], num_confusions=1)
    assert "acc5" not in m and m["num_classes"] == 4
    assert m["confusions"] == [{"true": 1, "predicted": 3, "count": 2}]


def test_classification_bad_input():
    images, classes, labels = _known_case()
    bad = labels.clone()
    bad[5] = 8
    _one_line_error(r"labels\[5\] = 8 is out of range for 8 classes \(0..7\)", classification_metrics,
                    images, classes, bad)
    _one_line_error("labels has 16 entries but image_emb has 17 rows", classification_metrics,
                    images, classes, labels[:-1])
    _one_line_error("image_emb has no rows", classification_metrics, images[:0], classes, labels[:0])
    _one_line_error("class_emb has no rows", classification_metrics, images, classes[:0], labels)
    _one_line_error("1-D tensor of integers", classification_metrics, images, classes, labels.double())
    _one_line_error("same embedding width", classification_metrics, images, classes[:, :5], labels)


# -- class embeddings ------------------------------------------------------------------------------
class _Encoder:
    """A fixed random vector per prompt text; records batch sizes."""

    def __init__(self, dim=6):
        self.dim, self.vectors, self.batches = dim, {}, []

    def __call__(self, texts):
        self.batches.append(len(texts))
        for t in texts:
            if t not in self.vectors:
                g = torch.Generator().manual_seed(len(self.vectors))
                self.vectors[t] = torch.randn(self.dim, generator=g, dtype=torch.float64) * (1 + len(t))
        return torch.stack([self.vectors[t] for t in texts])


def test_class_embeddings_average_normalised_prompts():
    names, templates = ["cat", "dog", "sea lion"], ["a {} photo.", "{}", "two {}s, {}!"]
    encoder = _Encoder()
    got = class_embeddings(encoder, names, templates, batch_size=4)
    assert max(encoder.batches) <= 4 and sum(encoder.batches) == 9
    assert "two sea lions, sea lion!" in encoder.vectors  # every {} is the class name
    for c, name in enumerate(names):
        prompts = [F.normalize(encoder.vectors[t.replace("{}", name)], dim=0) for t in templates]
        assert torch.allclose(got[c], F.normalize(sum(prompts) / 3, dim=0), rtol=0, atol=1e-12)
    assert torch.allclose(class_embeddings(encoder, names, templates, batch_size=1), got, rtol=0, atol=1e-12)


def test_zero_shot_end_to_end_with_default_templates():
    # Each prompt points at its class's axis plus a template-specific nuisance axis that averages out.
    names = ["apple", "bicycle", "cloud", "dolphin", "envelope", "forest"]
    templates = list(DEFAULT_TEMPLATES)

    def encode(texts):
        out = torch.zeros(len(texts), len(names) + len(templates))
        for i, text in enumerate(texts):
            c = next(c for c, n in enumerate(names) if n in text)
            t = next(t for t, tpl in enumerate(templates) if tpl.replace("{}", names[c]) == text)
            out[i, c], out[i, len(names) + t] = 1.0, 2.0
        return out

    classes = class_embeddings(encode, names)
    images = torch.eye(len(names), classes.shape[1]).repeat(3, 1)  # (18, d): 3 images on each class axis
    labels = torch.arange(len(names)).repeat(3)
    m = classification_metrics(images, classes, labels)
    assert m["acc1"] == m["acc5"] == m["mean_per_class_recall"] == 1.0 and m["confusions"] == []


def test_default_templates_are_ours_and_usable():
    assert 8 <= len(DEFAULT_TEMPLATES) <= 20 and len(set(DEFAULT_TEMPLATES)) == len(DEFAULT_TEMPLATES)
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)


def test_class_embeddings_bad_input():
    _one_line_error("no class names", class_embeddings, _Encoder(), [])
    _one_line_error("templates is empty", class_embeddings, _Encoder(), ["cat"], [])
    _one_line_error(r"entry 1 'a photo' has no \{\}", class_embeddings, _Encoder(), ["cat"],
                    ["{}", "a photo"])
    with pytest.raises(ValueError, match=r"encode_text returned \(1, 6\) for 2 texts"):
        class_embeddings(lambda texts: torch.zeros(1, 6), ["cat", "dog"], ["{}"])


# -- files -----------------------------------------------------------------------------------------
def test_load_classnames_and_templates(tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("cat\n  sea lion \ndog\n\n\n", encoding="utf-8")
    assert load_classnames(names) == ["cat", "sea lion", "dog"]
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n\n  the {} again  \n", encoding="utf-8")
    assert load_templates(templates) == ["a photo of a {}.", "the {} again"]


def test_bad_files(tmp_path):
    path = tmp_path / "f.txt"
    _one_line_error("not found", load_classnames, tmp_path / "missing.txt")
    path.write_text("\n\n", encoding="utf-8")
    _one_line_error("is empty", load_classnames, path)
    path.write_text("cat\n\ndog\n", encoding="utf-8")
    _one_line_error("line 2 is blank", load_classnames, path)
    path.write_text("cat\ndog\ncat\n", encoding="utf-8")
    _one_line_error("'cat' on line 3 repeats line 1", load_classnames, path)
    path.write_bytes(b"caf\xe9\n")
    _one_line_error(r"is not UTF-8 text \(byte 3\)", load_classnames, path)
    path.write_text("a photo of a {}.\na photo\n", encoding="utf-8")
    _one_line_error(r"line 2 'a photo' has no \{\}", load_templates, path)
    path.write_text("\n", encoding="utf-8")
    _one_line_error("has no templates", load_templates, path)


# -- text metrics (MLM accuracy, AR perplexity) ----------------------------------------------------
def _text_batches(seed: int, vocab: int = 11):
    """Uneven batches of (logits (B, L, V), labels (B, L)) with about half the positions ignored."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b, length in ((3, 5), (1, 9), (4, 2), (2, 7)):
        logits = torch.randn(b, length, vocab, generator=g) * 3
        labels = torch.randint(0, vocab, (b, length), generator=g)
        labels[torch.rand(b, length, generator=g) < 0.5] = -100
        logits[labels == -100] = float("nan")  # ignored positions must not matter, whatever they hold
        batches.append((logits, labels))
    return batches


def _add(metrics: TextMetrics, logits, labels) -> None:
    """One batch scored as MLM and as AR (the evaluator's per-chunk update)."""
    correct, tokens = mlm_counts(logits, labels)
    nll, ar_tokens = ar_counts(logits, labels)
    metrics.update(mlm_correct=correct, mlm_tokens=tokens, ar_nll_sum=nll, ar_tokens=ar_tokens)


def test_streaming_equals_whole_set_reference():
    batches = _text_batches(0)
    metrics = TextMetrics()
    for logits, labels in batches:
        _add(metrics, logits, labels)
    # Reference: every scored token on its own, in float64.
    tokens = [(lg.double(), y) for logits, labels in batches
              for lg, y in zip(logits.flatten(0, 1), labels.flatten().tolist()) if y != -100]  # (B*L, V)
    correct = sum(int(lg.argmax()) == y for lg, y in tokens)
    nll = sum(float(torch.logsumexp(lg, 0) - lg[y]) for lg, y in tokens)
    result = metrics.result()
    assert result["mlm_tokens"] == result["ar_tokens"] == len(tokens)
    assert result["mlm_accuracy"] == correct / len(tokens)
    assert result["ar_nll"] == pytest.approx(nll / len(tokens), rel=1e-6)
    assert result["ar_perplexity"] == pytest.approx(math.exp(nll / len(tokens)), rel=1e-6)


def test_perplexity_is_token_weighted_not_batch_averaged():
    metrics = TextMetrics()
    metrics.update(ar_nll_sum=2.0, ar_tokens=1)
    metrics.update(ar_nll_sum=torch.tensor(4.0), ar_tokens=torch.tensor(3))
    assert metrics.result() == {"ar_nll": 1.5, "ar_perplexity": math.exp(1.5), "ar_tokens": 4}


def test_merge_and_tensor_round_trip():
    batches = _text_batches(1)
    whole, first, second = TextMetrics(), TextMetrics(), TextMetrics()
    for i, (logits, labels) in enumerate(batches):
        for m in (whole, first if i % 2 else second):
            _add(m, logits, labels)
    merged = TextMetrics().merge(first).merge(second)
    assert merged.result() == pytest.approx(whole.result(), rel=1e-12)
    reduced = TextMetrics.from_tensor(first.as_tensor() + second.as_tensor())  # what an all-reduce gives
    assert reduced.result() == pytest.approx(whole.result(), rel=1e-12)


def test_text_metrics_edge_cases():
    mlm_only = TextMetrics()
    mlm_only.update(mlm_correct=3, mlm_tokens=4)
    assert mlm_only.result() == {"mlm_accuracy": 0.75, "mlm_tokens": 4}
    huge = TextMetrics(ar_nll_sum=1e6, ar_tokens=1)
    assert huge.result()["ar_perplexity"] == math.inf
    assert mlm_counts(torch.zeros(2, 3, 5), torch.full((2, 3), -100)) == (0, 0)
    assert ar_counts(torch.zeros(2, 3, 5), torch.full((2, 3), -100)) == (0.0, 0)
    _one_line_error("no MLM or AR tokens", TextMetrics().result)
    _one_line_error("correct <= tokens", TextMetrics().update, mlm_correct=5, mlm_tokens=4)
    _one_line_error("counts must be >= 0", TextMetrics().update, ar_tokens=-1)
    _one_line_error("finite sum >= 0", TextMetrics().update, ar_nll_sum=float("nan"), ar_tokens=3)
