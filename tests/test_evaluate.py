"""Accuracy intervals, the calibrated zero-shot baselines and length-sorted scoring."""

import math

import pytest
import torch

from post_fl.method.evaluate import (accuracy_of_scores, accuracy_summary, class_scores, contextual_calibration_bias,
                                     fit_class_bias, predict, standard_error, wilson_interval)
from post_fl.core.models import load_scoring_model

LABELS = ["negative", "positive"]


def test_wilson_interval_matches_reference_values_and_stays_in_range():
    lo, hi = wilson_interval(8, 10)  # reference: 0.4902, 0.9433 (Wilson 1927; e.g. statsmodels proportion_confint)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0 < hi < 0.2
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and 0.8 < lo < 1
    narrow, wide = wilson_interval(800, 1000), wilson_interval(80, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="correct"):
        wilson_interval(11, 10)


def test_accuracy_summary_has_interval_and_standard_error():
    s = accuracy_summary(0.75, 400)
    assert s["n"] == 400 and s["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 400))
    assert s["ci95"][0] < 0.75 < s["ci95"][1]
    assert standard_error(1.0, 10) == 0.0


def test_fitted_bias_removes_a_label_prior():
    """Scores that prefer class 1 by a constant: the raw argmax is near the prior, the fitted bias recovers the signal."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (400,), generator=g)
    signal = (y.float() * 2 - 1) + 0.5 * torch.randn(400, generator=g)
    scores = torch.stack([torch.zeros(400), signal + 3.0], -1)  # +3: always 'positive' without calibration
    raw = accuracy_of_scores(scores, y)
    bias = fit_class_bias(scores, y)
    assert raw == pytest.approx(float((y == 1).float().mean()))
    assert accuracy_of_scores(scores, y, bias) > 0.9 > raw + 0.3
    assert bias[0] == 0 and bias[1] < -2


def test_fitted_bias_for_three_classes_is_not_worse_than_none():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (300,), generator=g)
    scores = torch.nn.functional.one_hot(y, 3).float() + torch.randn(300, 3, generator=g) \
        + torch.tensor([0.0, 2.0, -1.0])
    bias = fit_class_bias(scores, y)
    assert accuracy_of_scores(scores, y, bias) > accuracy_of_scores(scores, y) + 0.1
    with pytest.raises(ValueError, match="labels"):
        fit_class_bias(scores, y[:10])


def test_length_sorted_scores_keep_input_order(tiny_dirs):
    model = load_scoring_model(tiny_dirs["causal"], LABELS, {"negative": ["bad"], "positive": ["good"]})
    texts = ["good", "the movie was very bad and the plot was sad", "nice film", "awful"]
    batched = class_scores(model, texts, batch_size=2)
    one_by_one = torch.cat([model(model.encode([t])) for t in texts])
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    assert predict(model, texts).tolist() == one_by_one.argmax(-1).tolist()


def test_contextual_calibration_equalises_content_free_inputs(tiny_dirs):
    model = load_scoring_model(tiny_dirs["causal"], LABELS, {"negative": ["bad"], "positive": ["good"]})
    bias = contextual_calibration_bias(model)
    assert bias.shape == (2,) and torch.isfinite(bias).all()
    cf = torch.log_softmax(model(model.encode(["N/A", "", "[MASK]"])), -1)
    calibrated = torch.softmax(torch.logsumexp(cf, 0) + bias, -1)  # mean content-free prob / itself: uniform
    assert torch.allclose(calibrated, torch.full((2,), 0.5), atol=1e-4)


def test_paired_difference_is_the_standard_error_of_per_example_differences():
    import math

    import pytest
    import torch

    from post_fl.method.evaluate import paired_difference, standard_error

    a = torch.tensor([1, 1, 1, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    b = torch.tensor([1, 1, 0, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)  # A also right where B is: two extra wins
    out = paired_difference(a, b)
    d = [1 if x and not y else -1 if y and not x else 0 for x, y in zip(a.tolist(), b.tolist())]
    mean = sum(d) / 10
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 9)
    assert out["difference"] == pytest.approx(0.2) and out["paired_stderr"] == pytest.approx(sd / math.sqrt(10))
    assert out["in_paired_standard_errors"] == pytest.approx(0.2 / (sd / math.sqrt(10)))
    independent = math.hypot(standard_error(0.7, 10), standard_error(0.5, 10))
    assert out["paired_stderr"] < independent  # agreeing examples add no variance
    assert paired_difference(a, a) == {"difference": 0.0, "paired_stderr": 0.0, "in_paired_standard_errors": 0.0}
    assert paired_difference(b, a)["in_paired_standard_errors"] == pytest.approx(-out["in_paired_standard_errors"])
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference(a, b[:5])
