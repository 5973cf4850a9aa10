"""`crossfed sd-spec CHECKPOINT_DIR`: the `model:` block a server needs for Stable Diffusion
recovery (eq. 6-7) -- the checkpoint's content digest and the names/shapes of the tensors the
federation fine-tunes -- so the server itself never needs the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer


def sd_spec_command(
    checkpoint: Annotated[Path, typer.Argument(help="Local diffusers checkpoint directory.")],
    clients_without_checkpoint: Annotated[
        str,
        typer.Option(
            "--clients-without-checkpoint",
            help="refuse: every client must hold it; feature: others join with feature recovery.",
        ),
    ] = "refuse",
) -> None:
    """Print the server config's model block for Stable Diffusion recovery (YAML)."""
    import yaml

    from crossfed.common.model.model_errors import StableDiffusionSetupError
    from crossfed.common.model.sd_trainable import checkpoint_digest, trainable_spec_of_checkpoint

    if clients_without_checkpoint not in ("refuse", "feature"):
        typer.echo("crossfed sd-spec: --clients-without-checkpoint is refuse or feature", err=True)
        raise typer.Exit(2)
    policy: Literal["refuse", "feature"] = (
        "refuse" if clients_without_checkpoint == "refuse" else "feature"
    )
    try:
        digest = checkpoint_digest(checkpoint)
        spec = trainable_spec_of_checkpoint(checkpoint)
    except StableDiffusionSetupError as exc:
        typer.echo(f"crossfed sd-spec: {exc}", err=True)
        raise typer.Exit(2) from None
    block = {
        "model": {
            "recovery": "stable-diffusion",
            "stable_diffusion": {
                "checkpoint_digest": digest,
                "clients_without_checkpoint": policy,
                "trainable": {name: list(shape) for name, shape in spec.items()},
            },
        }
    }
    typer.echo(f"# crossfed sd-spec {checkpoint}: merge into the server config")
    typer.echo(yaml.safe_dump(block, sort_keys=False, default_flow_style=None).rstrip())
