"""A `hf:` dataset never runs code of its own: datasets 4.0 removed loading scripts,
and diffqueue requires a version from there on."""
from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def test_the_required_datasets_version_runs_no_loading_script():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    required = [re.fullmatch(r"datasets>=([\d.]+)", r.replace(" ", "")) for r in extras if r.startswith("datasets")]
    assert len(required) == 1 and required[0], extras
    assert Version(required[0].group(1)) >= Version("4.0")
    assert Version(version("datasets")) >= Version(required[0].group(1))


def test_a_dataset_folder_with_a_loading_script_does_not_run_it(run_inline, tmp_path, monkeypatch):
    """`hf:local/evil` resolves to the folder ./local/evil when there is one (as a hub
    id would resolve to a repo): its evil.py is the loading script a hub repo could carry."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    ran = tmp_path / "the-script-ran"
    folder = tmp_path / "local" / "evil"
    folder.mkdir(parents=True)
    (folder / "evil.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    (folder / "train.csv").write_text("image,label\nx.png,0\n")

    job = run_inline("ddpm.train", {"preset": "tiny", "dataset": "hf:local/evil", "max_steps": 1})
    assert job.status == "failed"
    assert not ran.exists()
    assert "Dataset scripts are no longer supported, but found evil.py" in job.error
