"""Pushing an exported drafter to the Hugging Face Hub with huggingface_hub (`create_repo`,
`upload_folder`). The token comes from HF_TOKEN or the user's `hf auth login`, is handed to
huggingface_hub and to nothing else: never printed, logged or written, and scrubbed from any
error text that is shown.
"""

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError


class HubError(RuntimeError):
    """A push that could not happen: the message says why and what to do."""


@dataclass(frozen=True)
class PushPlan:
    repo_id: str
    private: bool
    revision: str | None
    overwrite: bool
    files: list[tuple[str, int]]  # (path in the repo, bytes)

    def describe(self, token_found: bool) -> str:
        endpoint = constants.ENDPOINT  # HF_ENDPOINT, or huggingface.co
        visibility = "private" if self.private else "public"
        branch = self.revision or "main"
        total = sum(size for _, size in self.files)
        lines = [
            f"push to {endpoint}/{self.repo_id} (branch {branch}; a new repo is {visibility}; "
            + ("an existing repo's files are replaced)" if self.overwrite else "refused if the repo exists)"),
            f"  {len(self.files)} files, {total / 1e6:.1f} MB:",
            *(f"    {name}  {size / 1e6:.2f} MB" for name, size in self.files),
            "  token: "
            + ("found (HF_TOKEN or the login)" if token_found else "none found; set HF_TOKEN or run `hf auth login`"),
        ]
        return "\n".join(lines)


def plan_push(folder: Path, repo_id: str, *, private: bool, revision: str | None, overwrite: bool) -> PushPlan:
    files = sorted(
        (path.relative_to(folder).as_posix(), path.stat().st_size) for path in folder.rglob("*") if path.is_file()
    )
    return PushPlan(repo_id, private, revision, overwrite, files)


def _scrubbed(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def push(folder: Path, plan: PushPlan) -> str:
    """Create the repo (or reuse it with overwrite), then upload the folder as one commit; returns its URL."""
    token = get_token()
    if not token:
        raise HubError(
            f"export.push_to={plan.repo_id}: no Hugging Face token. Set HF_TOKEN (a write token from "
            "https://huggingface.co/settings/tokens) or run `hf auth login`, then rerun; export.dry_run=true "
            "lists what would be pushed without one."
        )
    api = HfApi(token=token)
    try:
        exists = api.repo_exists(plan.repo_id)
        if exists and not plan.overwrite:
            raise HubError(
                f"export.push_to={plan.repo_id}: the repo exists. Set export.overwrite=true to replace its files "
                "with this export (one new commit), or push to another name."
            )
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        if plan.revision:
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=plan.repo_id,
            folder_path=folder,
            revision=plan.revision,
            commit_message="specdec-export",
            delete_patterns="*" if exists else None,  # the export replaces what was there
        )
    except HfHubHTTPError as error:
        raise _http_error(plan, error, token) from None
    except Exception as error:
        if not _is_network_error(error):
            raise
        first_line = (str(error).splitlines() or [""])[0]
        raise HubError(
            f"export.push_to={plan.repo_id}: the Hub ({constants.ENDPOINT}) could not be reached "
            f"({type(error).__name__}: {_scrubbed(first_line, token)}). Check the network (and that HF_HUB_OFFLINE is "
            "not set), or push the export directory later with `hf upload ORG/NAME DIR`."
        ) from None
    return commit.commit_url


def _is_network_error(error: Exception) -> bool:
    """No answer from the Hub: offline mode, a refused connection, DNS, a timeout (OSError, or the
    transport errors of the HTTP client huggingface_hub uses, httpx or httpx2 by version)."""
    return isinstance(error, OSError) or any(cls.__name__ == "TransportError" for cls in type(error).__mro__)


def _http_error(plan: PushPlan, error: HfHubHTTPError, token: str) -> HubError:
    status = error.response.status_code if error.response is not None else None
    why = {
        401: "the token was refused (expired or mistyped); make a new one and set HF_TOKEN",
        403: f"the token may not write to {plan.repo_id.split('/')[0]} (it needs write access to that user or org)",
    }.get(status, _scrubbed(str(error).splitlines()[0], token))
    return HubError(f"export.push_to={plan.repo_id}: the Hub answered {status}: {why}.")
