"""Prepared data for training: checks before workers start, and the collator.

:func:`check_training_data` runs on the driver (manifest and Parquet footers only);
:class:`Collator` runs on every worker and turns rows into model inputs with the loss on the
answer only.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecgvlm.config import ConfigError
from ecgvlm.prompt import build_training_text
from ecgvlm.train.config import IGNORE_INDEX, REQUIRED_COLUMNS, TrainConfig


class TrainDataError(ConfigError):
    """Prepared data that the run cannot use (missing split, columns or rows)."""


def split_files(data_dir: str | Path, split: str) -> list[str]:
    """The Parquet shards of one split, as the prepared data set's manifest lists them.

    Raises:
        TrainDataError: naming the data set and split when there is no manifest, no such
            split or a listed shard is missing.
    """
    from ecgvlm import storage
    from ecgvlm.dataset import split_files as manifest_split_files

    try:
        files = manifest_split_files(data_dir, split)
    except (FileNotFoundError, ValueError) as e:
        raise TrainDataError(f"data_dir {data_dir}: split {split!r}: {e}") from e
    missing = [p for p in files if not storage.is_file(p)]
    if missing:
        raise TrainDataError(f"split {split!r}: shard(s) listed in the manifest are missing: {missing}")
    if not files:
        raise TrainDataError(f"split {split!r} is empty (no shards in {data_dir}/manifest.json)")
    return files


@dataclass(frozen=True)
class DataSummary:
    """What the driver learns about the prepared data before workers start."""

    rows: dict[str, int]
    label_set: tuple[str, ...] = ()
    data_hash: str | None = None  # ecgvlm.dataset.data_hash of its manifest
    render_config_hash: str | None = None
    files: dict[str, list[str]] = field(default_factory=dict)


def check_training_data(config: TrainConfig) -> DataSummary:
    """Check the train and val splits exist, hold rows and carry the needed columns.

    Reads the manifest and the Parquet footers (schema, row counts) plus the
    ``option_labels`` column of the train split (for the adapter's label set); no image is
    decoded.

    Raises:
        TrainDataError: naming the split and the missing column, or the empty split.
    """
    import pyarrow.parquet as pq

    from ecgvlm.dataset import check_shards_readable, data_hash, read_manifest

    rows: dict[str, int] = {}
    files: dict[str, list[str]] = {}
    labels: set[str] = set()
    for split in (config.train_split, config.val_split):
        paths = split_files(config.data_dir, split)
        files[split] = [str(p) for p in paths]
        try:
            check_shards_readable(paths)
        except ValueError as e:
            raise TrainDataError(f"split {split!r}: {e}") from e
        n = 0
        for path in paths:
            meta = pq.ParquetFile(path)
            names = set(meta.schema_arrow.names)
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise TrainDataError(
                    f"split {split!r}: {path.rsplit('/', 1)[-1]} lacks column(s) {', '.join(missing)}; "
                    f"required: {', '.join(REQUIRED_COLUMNS)}"
                )
            n += meta.metadata.num_rows
            if split == config.train_split and "option_labels" in names:
                table = pq.read_table(path, columns=["option_labels"])
                for value in table.column("option_labels").to_pylist():
                    labels.update(value or ())
        if n == 0:
            raise TrainDataError(f"split {split!r} is empty ({len(paths)} shard(s), 0 rows)")
        rows[split] = n
    manifest = read_manifest(config.data_dir)
    return DataSummary(
        rows,
        tuple(sorted(labels)),
        data_hash(manifest),
        manifest.get("render_config_hash"),
        files,
    )


def stratified_sample(ids: Sequence[str], groups: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` of ``ids``, seeded, with every group keeping its share of them (rounded).

    Each group's ids are shuffled with ``seed`` and spread evenly over [0, 1) (the k-th of a
    group of size m at ``(k + u) / m``, ``u`` a seeded offset per group); the ``n`` lowest
    positions are taken. A group holding a fraction f of the ids gets ``n x f`` of the
    sample, give or take one, wherever it sorts.

    Returns:
        The chosen ids, sorted (all of them when ``n >= len(ids)``).
    """
    import random

    if n >= len(ids):
        return sorted(ids)
    rng = random.Random(seed)
    by_group: dict[str, list[str]] = {}
    for sample_id, group in zip(ids, groups):
        by_group.setdefault(str(group), []).append(str(sample_id))
    keyed = []
    for group in sorted(by_group):
        members = sorted(by_group[group])
        rng.shuffle(members)
        offset = rng.random()
        keyed += [((k + offset) / len(members), group, m) for k, m in enumerate(members)]
    return sorted(m for _, _, m in sorted(keyed)[:n])


def val_sample_ids(files: Sequence[str | Path], n: int, seed: int) -> list[str]:
    """The val subset: ``n`` sample ids stratified by the ``dataset`` column (see
    :func:`stratified_sample`; one group when the column is absent). Reads two columns."""
    import pyarrow.parquet as pq

    ids: list[str] = []
    groups: list[str] = []
    for path in files:
        names = set(pq.ParquetFile(path).schema_arrow.names)
        columns = ["sample_id"] + (["dataset"] if "dataset" in names else [])
        table = pq.read_table(path, columns=columns)
        column = table.column("sample_id").to_pylist()
        ids += column
        groups += table.column("dataset").to_pylist() if "dataset" in names else [""] * len(column)
    return stratified_sample(ids, groups, n, seed)


def read_val_rows(files: Sequence[str | Path], sample_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The val subset's rows (the trained-on columns and ``dataset``), in ``sample_ids`` order.

    Read by the driver with pyarrow and handed to every worker: the subset is small
    (``eval_max_samples``), and a Ray Data pipeline for it cost each worker half a minute of
    task start-up on a 2-core machine before the first step.
    """
    import pyarrow.parquet as pq

    wanted = set(sample_ids)
    found: dict[str, dict[str, Any]] = {}
    for path in files:
        names = set(pq.ParquetFile(path).schema_arrow.names)
        columns = list(REQUIRED_COLUMNS) + (["dataset"] if "dataset" in names else [])
        table = pq.read_table(path, columns=columns, filters=[("sample_id", "in", sorted(wanted))])
        found.update((row["sample_id"], row) for row in table.to_pylist())
    missing = wanted - found.keys()
    if missing:
        raise TrainDataError(f"val rows not found in {len(files)} val files: {sorted(missing)[:3]}")
    return [found[s] for s in sample_ids]


def _as_list(value: Any) -> list[Any]:
    return list(value.tolist() if hasattr(value, "tolist") else value)


def decode_png(png: bytes) -> Any:
    """PNG bytes to an RGB ``PIL.Image``."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return img.convert("RGB")


class Collator:
    """Rows of the prepared data to model inputs with the loss on the answer only.

    Each row becomes the ``llava_v1`` text ``prompt + " " + target_text + "</s>"``
    (``ecgvlm.prompt.build_training_text``) and its image, run through the model's processor
    as one batch. Labels copy ``input_ids`` except that the prompt (system line, image
    tokens, question, ``ASSISTANT:``) and padding are ``-100``: only the answer and its
    closing ``</s>`` are trained on.

    The answer's length is measured with the tokenizer alone, as the token count of the full
    text minus that of the prompt (the image expansion, if the processor does one, happens in
    the prompt and cancels out). The prompt's tokens must be a prefix of the full text's
    tokens, which holds for ``llava_v1`` because the prompt ends with ``ASSISTANT:``.

    Args:
        processor: ``processor(prompts, images) -> dict`` with ``input_ids`` and
            ``attention_mask`` (padded to a rectangle, either side) plus image tensors, and
            either ``encode_prompts(texts)`` (token ids without images, as
            ``ecgvlm.model.PulseProcessor`` has) or a callable ``tokenizer`` attribute.
        max_length: The model's ``tokenizer_model_max_length``: it cuts merged sequences
            (text plus image features) to this many positions, i.e. cuts the answer first.
            None: no limit.
        image_positions: ``image_positions((width, height))``, the positions an image takes
            in the merged sequence (``PulseModel.num_image_features``); needed with
            ``max_length``.
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        image_positions: Callable[[tuple[int, int]], int] | None = None,
    ) -> None:
        if max_length is not None and image_positions is None:
            raise ValueError("Collator: max_length needs image_positions to measure sequences")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.image_positions = image_positions

    def texts(self, batch: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """(prompts, full texts) for a batch of rows."""
        prompts, fulls = [], []
        for question, options, target in zip(
            _as_list(batch["question"]), _as_list(batch["options"]), _as_list(batch["target_text"])
        ):
            prompt, completion = build_training_text(str(question), _as_list(options), str(target))
            prompts.append(prompt)
            fulls.append(prompt + completion)
        return prompts, fulls

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of texts without touching images (``encode_prompts`` where it exists)."""
        if hasattr(self.processor, "encode_prompts"):
            return self.processor.encode_prompts(list(texts))
        return self.tokenizer(list(texts))["input_ids"]

    def answer_lengths(self, prompts: Sequence[str], fulls: Sequence[str]) -> list[int]:
        """Tokens of each answer (target + ``</s>``), measured with the tokenizer alone."""
        prompt_ids = self.token_ids(prompts)
        full_ids = self.token_ids(fulls)
        lengths = []
        for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
            p, f = list(p), list(f)
            if f[: len(p)] != p:
                raise RuntimeError(
                    f"row {i}: the prompt's tokens are not a prefix of prompt+answer's tokens; "
                    "the answer mask would be misplaced"
                )
            if len(f) == len(p):
                raise RuntimeError(f"row {i}: the answer tokenises to nothing")
            lengths.append(len(f) - len(p))
        return lengths

    def check_lengths(
        self, batch: Mapping[str, Any], fulls: Sequence[str], images: Sequence[Any],
        answer_lengths: Sequence[int],
    ) -> None:
        """Refuse rows whose answer the model's ``max_length`` cut would shorten.

        A cut answer trains on a text without its end (and with every answer token cut,
        a micro-batch's loss is NaN).

        Raises:
            TrainDataError: naming the sample id, its length and the limit.
        """
        if self.max_length is None or self.image_positions is None:
            return
        ids = _as_list(batch.get("sample_id", range(len(fulls))))
        for i, (tokens, image) in enumerate(zip(self.token_ids(fulls), images)):
            # The image placeholder token is replaced by the image's feature positions.
            merged = len(tokens) - 1 + self.image_positions(image.size)
            if merged > self.max_length:
                raise TrainDataError(
                    f"sample {ids[i]}: prompt, image and answer take {merged} positions, more "
                    f"than the model's tokenizer_model_max_length {self.max_length}; "
                    f"{min(merged - self.max_length, answer_lengths[i])} of its "
                    f"{answer_lengths[i]} answer tokens would be cut (shorten the text or "
                    "render a smaller image)"
                )

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        prompts, fulls = self.texts(batch)
        images = [decode_png(bytes(png)) for png in _as_list(batch["png"])]
        inputs = dict(self.processor(fulls, images))
        input_ids = torch.as_tensor(inputs["input_ids"])
        attention = torch.as_tensor(inputs["attention_mask"])
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        lengths = self.answer_lengths(prompts, fulls)
        self.check_lengths(batch, fulls, images, lengths)
        for i, n_answer in enumerate(lengths):
            real = torch.nonzero(attention[i], as_tuple=False).flatten()
            # The last n_answer real tokens are the answer, whatever side the padding is on.
            answer_pos = real[-n_answer:]
            labels[i, answer_pos] = input_ids[i, answer_pos]
        inputs["input_ids"] = input_ids
        inputs["attention_mask"] = attention
        inputs["labels"] = labels
        return inputs
