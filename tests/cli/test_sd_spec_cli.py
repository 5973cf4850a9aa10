"""`crossfed sd-spec DIR` prints a model block the server config accepts (digest + trainable
spec of the checkpoint, no weights needed by the server); a bad directory is one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import yaml
from crossfed.common.config import ServerConfig
from crossfed.common.model.sd_random_checkpoint import save_random_stable_diffusion
from crossfed.common.model.sd_trainable import checkpoint_digest, trainable_spec_of_checkpoint
from typer.testing import CliRunner

from crossfed.cli import app


def test_sd_spec_block_configures_a_server(tmp_path: Path) -> None:
    checkpoint = save_random_stable_diffusion(tmp_path / "sd")
    out = CliRunner().invoke(
        app, ["sd-spec", str(checkpoint), "--clients-without-checkpoint", "feature"]
    )
    assert out.exit_code == 0, out.output
    block = yaml.safe_load(out.output)["model"]
    config = ServerConfig.model_validate({"model": {**block, "text_dim": 16}})
    sd = config.model.stable_diffusion
    assert sd is not None and sd.clients_without_checkpoint == "feature"
    assert sd.checkpoint_digest == checkpoint_digest(checkpoint)
    assert sd.trainable_spec() == trainable_spec_of_checkpoint(checkpoint)


def test_sd_spec_of_a_non_checkpoint_is_one_line(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["sd-spec", str(tmp_path)])
    assert out.exit_code == 2
    assert out.output.strip().count("\n") == 0 and "model_index.json" in out.output
