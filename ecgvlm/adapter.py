"""A LoRA adapter as a self-describing artifact: a PEFT directory plus ``ecgvlm.json``.

The PEFT half (``adapter_config.json`` + ``adapter_model.safetensors``) is what
``peft.PeftModel.from_pretrained`` and multi-LoRA servers read; ``ecgvlm.json`` says what the
adapter was trained from (base model, label set, render config and data manifest hashes, git
sha, the resolved train config), so an adapter found on disk can be traced back to its run.

Heavy imports (torch, peft) happen inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "ecgvlm.json"
MANIFEST_VERSION = 1


class AdapterError(ValueError):
    """An adapter directory that is missing files or carries an unreadable manifest."""


#: The weight files PEFT reads from an adapter folder, either one.
PEFT_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


def check_peft_dir(path: str) -> None:
    """Raise AdapterError when ``path`` (a folder or an object store's prefix) holds no PEFT
    adapter: ``adapter_config.json`` and one of :data:`PEFT_WEIGHT_NAMES`. ``ecgvlm serve``
    checks every adapter so before Ray starts; a replica would find out only once running."""
    from ecgvlm import storage

    if not storage.is_file(storage.join(path, "adapter_config.json")):
        raise AdapterError(f"{path} is not a PEFT adapter folder: it has no adapter_config.json "
                           "(a training run writes its adapter to the config's output_dir)")
    if not any(storage.is_file(storage.join(path, name)) for name in PEFT_WEIGHT_NAMES):
        raise AdapterError(f"{path} has adapter_config.json but no weights "
                           f"({' or '.join(PEFT_WEIGHT_NAMES)})")


def hash_json(value: Any) -> str:
    """A short stable hash of JSON-serialisable data (sorted keys), e.g. a render config."""
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_file(path: str | Path) -> str:
    """A short sha256 of one file's bytes (e.g. a prepared dataset's manifest; a path or a
    URI)."""
    from ecgvlm import storage

    return hashlib.sha256(storage.read_bytes(path)).hexdigest()[:16]


def current_git_sha(cwd: str | Path | None = None) -> str | None:
    """The checked-out commit, or None outside a git checkout (e.g. a Ray working_dir copy)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@dataclass(frozen=True)
class AdapterArtifact:
    """What ``ecgvlm.json`` records about one adapter.

    Attributes:
        base_model: The base checkpoint the adapter applies to (local path or model id).
        label_set: The canonical findings the training data's options drew from.
        render_config_hash: Hash of the render config the training images were drawn with.
        data_manifest_hash: Hash of the prepared data set's manifest.
        git_sha: Commit of the code that trained the adapter.
        train_config: The resolved training config.
        step: Optimizer steps taken when the adapter was saved.
        metrics: Metrics at that step (train loss, val loss, val accuracy...).
    """

    base_model: str
    label_set: tuple[str, ...] = ()
    render_config_hash: str | None = None
    data_manifest_hash: str | None = None
    git_sha: str | None = None
    train_config: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["label_set"] = list(self.label_set)
        return json.dumps(data, indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> AdapterArtifact:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{where} is not valid JSON: {e}") from e
        names = {f.name for f in dataclasses.fields(cls)}
        if "base_model" not in data:
            raise AdapterError(f"{where} has no base_model")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["label_set"] = tuple(kwargs.get("label_set", ()))
        return cls(**kwargs)

    def save(self, model: Any, directory: str | Path) -> Path:
        """Write ``model``'s adapter weights (PEFT format) and this manifest to ``directory``.

        Args:
            model: A ``peft.PeftModel``; only its adapter weights are written.
            directory: Created if missing.

        Returns:
            The directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(directory))
        (directory / MANIFEST_NAME).write_text(self.to_json())
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> AdapterArtifact:
        """Read the manifest of an adapter directory, checking the PEFT files are there.

        Raises:
            AdapterError: naming the directory and the missing file.
        """
        directory = Path(directory)
        for name in ("adapter_config.json", MANIFEST_NAME):
            if not (directory / name).is_file():
                raise AdapterError(f"{directory} is not an ecgvlm adapter: {name} is missing")
        return cls.from_json((directory / MANIFEST_NAME).read_text(), str(directory / MANIFEST_NAME))


def apply_adapter(model: Any, directory: str | Path, is_trainable: bool = False) -> Any:
    """Wrap a loaded base model with the adapter in ``directory`` (``PeftModel``)."""
    from peft import PeftModel

    AdapterArtifact.load(directory)
    return PeftModel.from_pretrained(model, str(directory), is_trainable=is_trainable)
