"""From what the user typed to a checkpoint on disk: a local path, a training run, or a hub name.

The one rule every model follows (`--checkpoint SPEC`, `Model.from_pretrained(SPEC)`):

1. SPEC is a path that exists: that file or directory. A training run directory stands for
   its best checkpoint, else its latest (the rule is in `fromscratch.checkpoints.runs`).
2. Otherwise SPEC is a Hugging Face hub repository id (`owner/name`, e.g.
   `Helsinki-NLP/opus-mt-en-id`): it is fetched with `huggingface_hub` into its usual cache
   (`~/.cache/huggingface/hub`, or `$HF_HOME`), or found there when already downloaded.
3. Anything else is a UserError that says which of the two it is not.
"""

import os
import re
from pathlib import Path

from fromscratch.errors import UserError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hub_download(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """Fetch (or find in the cache) the files of hub repository `repo_id`; their local directory.

    The one place the package touches the network; tests replace it with a local directory."""
    import huggingface_hub

    return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=allow_patterns))


def resolve_checkpoint(spec: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """The local path of the checkpoint `spec` names (rules 1–3 of the module docstring); a run
    directory is returned as it is (`runs.run_checkpoint` tells the step it stands for)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if not HUB_ID.fullmatch(text) or text.startswith((".", "/", "~")):
        raise UserError(f"{text}: no such file or directory (nor a hub name like owner/model)")
    try:
        from huggingface_hub import errors
    except ImportError:
        raise UserError(f"{text} is not a local path, and fetching it from the Hugging Face hub needs "
                        "huggingface_hub: pip install huggingface_hub") from None
    try:
        return hub_download(text, allow_patterns)
    except errors.GatedRepoError:
        raise UserError(f"{text} is a gated model on the Hugging Face hub: accept its licence on "
                        f"https://huggingface.co/{text} and log in (`hf auth login` or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{text}: no such local path, and no such model on the Hugging Face hub "
                        "(or it is private: log in with `hf auth login`)") from None
    except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, OSError) as e:
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{text} is not a local path, and the Hugging Face hub could not be reached to fetch "
                        f"it ({cause}); download it where there is network, or pass its local directory") from None
