"""`crossfed client ...`: start a client daemon. Flags override the config file, which
overrides the defaults (env CROSSFED_* in between); every bad input is one clear line."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

client_app = typer.Typer(
    help="Client daemon: register, train locally on cached embeddings, upload.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class ModalityChoice(str, Enum):
    """Table I configuration this client holds."""

    both = "both"
    text_only = "text_only"
    image_only = "image_only"


def _class_list(value: str) -> list[str]:
    """--classes as a list (comma-separated or @FILE); a bad list is one line, exit 2."""
    from crossfed.common.data.class_list import ClassListError, parse_class_list

    try:
        return parse_class_list(value)
    except ClassListError as exc:
        typer.echo(f"crossfed client: --classes: {exc}", err=True)
        raise typer.Exit(2) from None


def _overrides(**flags: object) -> dict[str, object]:
    """Only the flags the user gave (None means 'not given')."""
    return {key: value for key, value in flags.items() if value is not None}


@client_app.command("start")
def start(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML/TOML ClientConfig.")
    ] = None,
    server: Annotated[str | None, typer.Option("--server", help="Coordinator host:port.")] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="'builtin' (synthetic shapes shard), a .csv/.jsonl manifest, or a pre-encoded "
            "EmbeddingSet .safetensors file.",
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes",
            help="Manifest data: the federation's class names in index order, comma-separated "
            "or @FILE (one per line); must equal the server's. Unset: labels are mapped by "
            "name onto the class list the server sends.",
        ),
    ] = None,
    skip_bad_rows: Annotated[
        bool,
        typer.Option(
            "--skip-bad-rows",
            help="Manifest data: skip rows that cannot be used (unreadable image, unknown "
            "label, both cells empty) and report how many, instead of stopping at the first.",
        ),
    ] = False,
    modality: Annotated[
        ModalityChoice | None,
        typer.Option(
            "--modality",
            help="Modalities this client holds (built-in data; a manifest's rows say theirs).",
        ),
    ] = None,
    client_index: Annotated[int | None, typer.Option("--client-index", help="Shard index.")] = None,
    num_clients: Annotated[
        int | None, typer.Option("--num-clients", help="Shards in total.")
    ] = None,
    num_samples: Annotated[
        int | None, typer.Option("--num-samples", help="Builtin dataset size.")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option("--alpha", help="Dirichlet label-skew alpha.")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Dataset/partition seed.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads.")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Embedding cache dir.")
    ] = None,
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Credential, accountant, rounds.jsonl.")
    ] = Path(".crossfed-client"),
    client_id: Annotated[str | None, typer.Option("--client-id", help="Stable client id.")] = None,
    enrollment_token: Annotated[
        str | None,
        typer.Option(
            "--enrollment-token", envvar="CROSSFED_ENROLLMENT_TOKEN", help="One-time token."
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Local epochs per round.")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Local batch size.")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plaintext gRPC (dev only).")
    ] = False,
    cert_dir: Annotated[
        Path | None, typer.Option("--cert-dir", help="`crossfed certs` dir.")
    ] = None,
    no_projection_dp: Annotated[
        bool,
        typer.Option(
            "--no-projection-dp",
            help="Share exact projections (no DP noise; a server that mandates DP overrides it).",
        ),
    ] = False,
    noise_multiplier: Annotated[
        float | None, typer.Option("--noise-multiplier", help="Projection DP sigma.")
    ] = None,
    no_projections: Annotated[
        bool, typer.Option("--no-projections", help="Skip eq. 16 exchange.")
    ] = False,
    no_calibration_stats: Annotated[
        bool,
        typer.Option(
            "--no-calibration-stats",
            help="Send empty statistics in the calibration round (not noised by any DP).",
        ),
    ] = False,
    dp_sgd_epsilon: Annotated[
        float | None,
        typer.Option(
            "--dp-sgd-epsilon",
            help="Train with Opacus DP-SGD at this epsilon per round (delta from config).",
        ),
    ] = None,
    sd_checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--sd-checkpoint",
            help="Local diffusers checkpoint for Stable Diffusion recovery (runs with "
            "model.recovery stable-diffusion).",
        ),
    ] = None,
    sd_device: Annotated[
        str | None,
        typer.Option(
            "--sd-device", help="auto (CUDA if present, else feature recovery), cpu, cuda[:N]."
        ),
    ] = None,
    holdout: Annotated[
        float, typer.Option("--holdout", help="Local share held out for eval.")
    ] = 0.2,
    text_encoder: Annotated[
        str, typer.Option("--text-encoder", help="'minilm' or HF dir.")
    ] = "minilm",
    image_encoder: Annotated[
        str, typer.Option("--image-encoder", help="'cnn' (pretrained), 'cnn-random' or HF dir.")
    ] = "cnn",
    give_up_after: Annotated[
        float,
        typer.Option(
            "--give-up-after", help="Seconds of failing in a row before exiting (0: never)."
        ),
    ] = 600.0,
    max_rounds: Annotated[
        int | None, typer.Option("--max-rounds", help="Leave after N rounds.")
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run a client daemon until the server ends the run."""
    from crossfed.client.errors import ClientError
    from crossfed.common.config import ClientConfig, ConfigError, load_config

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    data_file: Path | None = None
    data_kind: str | None = None
    manifest: str | None = None
    if data is not None:
        if data.endswith(".safetensors"):
            data_file = Path(data)
        elif data in ("builtin", "builtin:shapes"):
            data_kind = "builtin"
        else:
            data_kind, manifest = "manifest", data
    overrides = _overrides(
        server_address=server,
        client_id=client_id,
        threads=threads,
        cache_dir=str(cache_dir) if cache_dir else None,
        enrollment_token=enrollment_token,
        **{
            "data.kind": data_kind,
            "data.path": manifest,
            "data.class_names": _class_list(classes) if classes else None,
            "data.skip_bad_rows": True if skip_bad_rows else None,
            "data.modality": modality.value if modality else None,
            "data.client_index": client_index,
            "data.num_clients": num_clients,
            "data.num_samples": num_samples,
            "data.dirichlet_alpha": alpha,
            "data.seed": seed,
            "train.epochs": epochs,
            "train.batch_size": batch_size,
            "tls.insecure": True if insecure else None,
            "tls.cert_dir": str(cert_dir) if cert_dir else None,
            "privacy.projection_dp": False if no_projection_dp else None,
            "privacy.noise_multiplier": noise_multiplier,
            "privacy.dp_sgd": True if dp_sgd_epsilon is not None else None,
            "privacy.dp_sgd_target_epsilon": dp_sgd_epsilon,
            "stable_diffusion.checkpoint": str(sd_checkpoint) if sd_checkpoint else None,
            "stable_diffusion.device": sd_device,
        },
    )
    if skip_bad_rows and (data_kind == "builtin" or data_file is not None):
        typer.echo(
            "crossfed client: --skip-bad-rows applies to a manifest (--data FILE.csv)", err=True
        )
        raise typer.Exit(2)
    try:
        cfg = load_config(ClientConfig, config, overrides=overrides)
    except ConfigError as exc:  # before the heavy imports: bad input fails fast
        typer.echo(f"crossfed client: {exc}", err=True)
        raise typer.Exit(2) from None

    from crossfed.client.daemon import ClientDaemon, DaemonOptions
    from crossfed.common.data.data_errors import DataError
    from crossfed.common.privacy.privacy_accountant import PrivacyAccountantError

    try:
        options = DaemonOptions(
            state_dir=state_dir,
            data_file=data_file,
            holdout_fraction=holdout,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            give_up_after_s=give_up_after if give_up_after > 0 else None,
            share_projections=not no_projections,
            share_calibration_stats=not no_calibration_stats,
            progress=not no_progress,
            max_rounds=max_rounds,
        )
        daemon = ClientDaemon(cfg, options, echo=typer.echo)
        daemon.install_signal_handlers()
        daemon.run()
    except (ClientError, DataError, PrivacyAccountantError, ValueError) as exc:
        typer.echo(f"crossfed client: {exc}", err=True)
        raise typer.Exit(2) from None
