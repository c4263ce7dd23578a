"""ddpm.schedule_plot, run in process through the real Executor (the book's noise-schedule figures)."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from shared.errors import SpecError
from shared.specs import validate_params

PAD = 2  # worker.diffusion.make_grid's padding between and around images


def grid_size(rows: int, cols: int, side: int) -> tuple[int, int]:
    return cols * side + (cols + 1) * PAD, rows * side + (rows + 1) * PAD


def succeeded(job):
    assert job.status == "succeeded", f"{job.error}\n{job.traceback}"
    return job


def test_default_schedules_plot_and_noised_grid(run_inline):
    job = succeeded(run_inline("ddpm.schedule_plot", {"image_size": 16}))
    assert job.queue == "cpu"
    names = {a.name for a in job.artifacts}
    assert {"schedules.png", "noised.png", "schedules.json"} <= names

    plot = Image.open(io.BytesIO(job.read("schedules.png")))
    assert plot.format == "PNG" and plot.width > 400 and plot.height > 300
    noised = Image.open(io.BytesIO(job.read("noised.png")))
    assert noised.size == grid_size(rows=4, cols=8, side=16)
    assert json.loads(noised.text["timesteps"]) == [0, 142, 285, 428, 570, 713, 856, 999]  # linspace(0, 999, 8)

    data = json.loads(job.read("schedules.json"))
    assert data["num_train_timesteps"] == 1000 and data["timesteps_shown"] == [0, 142, 285, 428, 570, 713, 856, 999]
    by_label = {s["label"]: s for s in data["schedules"]}
    assert list(by_label) == ["linear", "cosine", "low beta_end=0.003", "high beta_end=0.1"]
    assert by_label["linear"]["config"] == {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
    assert by_label["cosine"]["config"] == {"beta_schedule": "squaredcos_cap_v2"}
    for s in data["schedules"]:
        assert s["t"][0] == 0 and s["t"][-1] == 999 and len(s["t"]) == len(s["signal"]) == len(s["noise"]) <= 200
        # The signal only falls and the noise only grows (to 6 decimals: `high` reaches 0 early).
        assert all(a >= b for a, b in zip(s["signal"], s["signal"][1:])), s["label"]
        assert all(a <= b for a, b in zip(s["noise"], s["noise"][1:])), s["label"]
        assert s["signal"][0] > 0.99 and s["signal"][-1] < 0.5 * s["signal"][0]
        for sig, noi in zip(s["signal"], s["noise"]):
            assert sig**2 + noi**2 == pytest.approx(1, abs=1e-5)
    for label in ["linear", "low beta_end=0.003", "high beta_end=0.1"]:
        # alpha_bar_0 = 1 - beta_start
        assert by_label[label]["signal"][0] == pytest.approx(math.sqrt(1 - 0.0001), abs=1e-6)
    # A higher beta_end destroys the signal sooner; the cosine curve differs from the linear one.
    linear, cosine = by_label["linear"], by_label["cosine"]
    mid = linear["t"].index(min(linear["t"], key=lambda t: abs(t - 500)))
    assert by_label["high beta_end=0.1"]["signal"][mid] < linear["signal"][mid] < by_label["low beta_end=0.003"]["signal"][mid]
    assert max(abs(a - b) for a, b in zip(linear["noise"], cosine["noise"])) > 0.1
    assert linear["signal"][-1] == pytest.approx(0.0064, abs=1e-3)  # the linear schedule's end, as in diffusers

    # Row r, column 0 is t = 0: nearly the clean image; the last column is nearly all noise.
    cols = np.asarray(noised).astype(float)
    first = cols[PAD : PAD + 16, PAD : PAD + 16]
    assert first.std() > 40  # a digit, not noise-grey


def test_custom_schedules_and_timesteps(run_inline):
    params = {
        "num_train_timesteps": 100,
        "num_timesteps_shown": 5,
        "image_size": 8,
        "schedules": [{"beta_schedule": "scaled_linear", "beta_start": 0.001, "beta_end": 0.05},
                      {"beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.05, "label": "mine"}],
    }
    job = succeeded(run_inline("ddpm.schedule_plot", params))
    assert Image.open(io.BytesIO(job.read("noised.png"))).size == grid_size(rows=2, cols=5, side=8)
    data = json.loads(job.read("schedules.json"))
    assert data["timesteps_shown"] == [0, 24, 49, 74, 99]
    assert [s["label"] for s in data["schedules"]] == ["scaled_linear 0.001-0.05", "mine"]
    assert all(len(s["t"]) == 100 for s in data["schedules"])
    assert data["schedules"][1]["signal"][0] == pytest.approx(math.sqrt(1 - 0.001), abs=1e-6)
    assert job.result["schedules"] == ["scaled_linear 0.001-0.05", "mine"]


def test_an_uploaded_image(run_inline, sqlite_settings, tmp_path):
    from shared.db import make_engine, make_sessionmaker
    from shared.storage import make_storage
    from shared.uploads import save_upload

    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    sessions = make_sessionmaker(make_engine(sqlite_settings.database_url))
    upload = save_upload(sessions, make_storage(sqlite_settings), sqlite_settings, "red.png", path)

    job = succeeded(run_inline("ddpm.schedule_plot", {"image": f"upload:{upload.id}", "image_size": 8,
                                                      "schedules": [{"beta_schedule": "linear"}]}))
    noised = Image.open(io.BytesIO(job.read("noised.png")))
    assert noised.mode == "RGB" and noised.size == grid_size(rows=1, cols=8, side=8)
    clean = np.asarray(noised)[PAD : PAD + 8, PAD : PAD + 8].reshape(-1, 3)  # t = 0
    assert np.abs(clean.mean(axis=0) - [200, 30, 30]).max() < 10

    missing = run_inline("ddpm.schedule_plot", {"image": "upload:" + "0" * 32})
    assert missing.status == "failed" and "upload:" + "0" * 32 in missing.error


@pytest.mark.parametrize(
    "params, field, fragment",
    [
        ({"schedules": []}, "schedules", "at least 1"),
        ({"schedules": [{"beta_schedule": "linear"}] * 9}, "schedules", "at most 8"),
        ({"schedules": [{"beta_schedule": "sigmoid"}]}, "schedules.0.beta_schedule", "squaredcos_cap_v2"),
        ({"schedules": [{"beta_start": 0.02, "beta_end": 0.01}]}, "schedules.0", "beta_end 0.01 must be greater"),
        ({"image": "mnist"}, "image", "digits|upload"),
        ({"num_timesteps_shown": 20}, "num_timesteps_shown", "less than or equal to 16"),
        ({"num_train_timesteps": 10, "num_timesteps_shown": 12}, "num_timesteps_shown", "more than num_train_timesteps"),
    ],
)
def test_spec_errors_name_the_field(params, field, fragment):
    with pytest.raises(SpecError) as info:
        validate_params("ddpm.schedule_plot", params)
    assert field in info.value.fields, info.value.fields
    assert fragment in info.value.fields[field]


def test_schema_declares_the_upload_field():
    from shared.specs import KINDS

    schema = KINDS["ddpm.schedule_plot"].spec.model_json_schema()
    assert schema["properties"]["image"]["upload_kind"] == "image"
    assert len(schema["properties"]["schedules"]["default"]) == 4
