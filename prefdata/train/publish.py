"""Upload a finished run's model to the Hugging Face Hub (``prefdata train --push-to-hub``).

The token comes from ``HF_TOKEN`` only and is never logged. Checkpoints and TensorBoard
files stay local; the model (or LoRA adapter), tokenizer, ``run.json`` and ``log.jsonl``
go up. Without a network the model stays saved and the error says how to push later.
"""

from __future__ import annotations

import os
from pathlib import Path

LOCAL_ONLY = ["checkpoints/**", "tensorboard/**", "wandb/**", ".tmp-*"]


def push_model(out: str | Path, repo_id: str, private: bool = False) -> str:
    out = Path(out)
    if not any(out.glob("*.safetensors")):
        raise ValueError(f"{out} holds no trained model (*.safetensors); train to the end before --push-to-hub")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise ValueError("--push-to-hub needs HF_TOKEN in the environment (a write token); the model is saved "
                         f"in {out}")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="model", ignore_patterns=LOCAL_ONLY)
    except Exception as exc:  # network, auth, permissions: all end the same way for the user
        raise ValueError(
            f"could not push {out} to the Hub repo {repo_id} ({type(exc).__name__}: {str(exc)[:200]}); the model "
            f"is saved in {out}; push it later with: huggingface-cli upload {repo_id} {out} "
            f"--exclude '{LOCAL_ONLY[0]}'"
        ) from None
    return f"https://huggingface.co/{repo_id}"
