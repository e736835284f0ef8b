"""A config file is data, not code: class paths in the encoding YAML must name feature networks."""

from __future__ import annotations

import pytest


def test_encoding_models_refuse_a_class_that_is_not_a_network(tmp_path):
    from neurovision.encoding.pipeline import instantiate_network

    marker = tmp_path / "ran"
    spec = {"class_path": "subprocess.Popen", "init_args": {"args": f"touch {marker}", "shell": True}}
    with pytest.raises(ValueError, match=r"models.evil.class_path.*not a torch.nn.Module"):
        instantiate_network("evil", spec)
    assert not marker.exists()
