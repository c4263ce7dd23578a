"""The quality bench, reduced: the tiny preset trained through real web and worker
processes, sampled per class, and judged by an independent digits classifier.
The full version with the `digits` preset is bench/digits_quality.py."""
from __future__ import annotations

import pytest

from bench.digits_quality import measure

pytestmark = pytest.mark.e2e


def test_tiny_training_makes_recognisable_digits(sqlite_settings, start_services):
    svc = start_services(sqlite_settings)
    result = measure(svc.url + "/api/v1", {"preset": "tiny"}, per_class=5)
    assert result["classifier_held_out_accuracy"] > 0.95  # the judge itself is sound
    assert result["train_steps"] == 300 and result["train_images_per_s"] > 0
    # Chance is 10%; the tiny budget reaches well above it.
    assert result["accuracy"] >= 0.3, result
