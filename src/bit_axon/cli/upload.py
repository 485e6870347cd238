"""``bit-axon upload``: publish a trained adapter or a model directory on the Hugging Face hub, with a model card."""

from __future__ import annotations

from pathlib import Path

from bit_axon.inference.model_card import CARD, UploadError, UploadPlan, plan_upload
from bit_axon.tokenizer import hub_unreachable

import typer


def push(plan: UploadPlan, repo_id: str, private: bool, token: str | None) -> str:
    """Create ``repo_id`` (if new) and upload the plan's files and card in one commit; the commit's URL.

    One ``create_commit`` rather than ``upload_folder``: the files go up from where they are and the
    card from memory, so nothing is copied to a staging folder or written into the user's directory.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan.files.items()]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=plan.card.encode("utf-8")))
    info = api.create_commit(repo_id, operations, commit_message=f"Upload {plan.kind} with bit-axon")
    return info.commit_url


def upload(
    directory: Path = typer.Argument(
        ..., help="A training output directory (its adapter is uploaded) or a model directory (config.json + weights)."
    ),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repository to create or update, e.g. you/my-adapter."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    token: str | None = typer.Option(None, "--token", help="Hugging Face token (default: HF_TOKEN or the saved login)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the files and the model card; upload nothing."),
) -> None:
    """Upload an adapter or a model to the Hugging Face hub, with a model card (fails within seconds when offline)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError

    try:
        plan = plan_upload(directory, repo_id)
    except (UploadError, OSError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    if dry_run:
        typer.echo(f"Would upload to {repo_id}:")
        for line in plan.listing():
            typer.echo(f"  {line}")
        typer.echo(f"\n{plan.card}")
        return
    # The hub client retries a dead connection for a long time; a short probe fails fast instead.
    if why := hub_unreachable():
        typer.echo(
            f"Error: cannot reach the Hugging Face hub at {constants.ENDPOINT} ({why}); nothing was uploaded. "
            "Check the connection, or use --dry-run to see what would be uploaded",
            err=True,
        )
        raise typer.Exit(1)
    try:
        url = push(plan, repo_id, private, token)
    except (OSError, HFValidationError) as err:  # hub HTTP errors are OSErrors
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        typer.echo(f"Error: could not upload to {repo_id}: {message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"Uploaded {plan.kind} {directory} to {repo_id}: {url}")
