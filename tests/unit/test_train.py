"""Unit tests of ecgvlm.train: the collator's loss mask and config / data validation."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ecgvlm.config import ConfigError, config_from_dict, load_config
from ecgvlm.prompt import build_prompt
from ecgvlm.train import (
    IGNORE_INDEX,
    REQUIRED_COLUMNS,
    Collator,
    TrainConfig,
    check_training_data,
    resolve_deepspeed_config,
)

REPO = Path(__file__).resolve().parents[2]


class CharTokenizer:
    """One token per character; ``</s>`` is EOS, ``<image>`` one placeholder token."""

    pad_token_id, bos_token_id, eos_token_id, image_token_id = 0, 1, 2, 3

    def encode(self, text: str) -> list[int]:
        ids = [self.bos_token_id]
        i = 0
        while i < len(text):
            if text.startswith("</s>", i):
                ids.append(self.eos_token_id)
                i += 4
            elif text.startswith("<image>", i):
                ids.append(self.image_token_id)
                i += 7
            else:
                ids.append(ord(text[i]) + 10)
                i += 1
        return ids

    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return {"input_ids": [self.encode(t) for t in texts]}

    def decode(self, ids: list[int]) -> str:
        return "".join("</s>" if i == 2 else chr(i - 10) for i in ids if i >= 10 or i == 2)


class FakeProcessor:
    """Expands ``<image>`` into several image tokens (as LLaVA-NeXT processors do) and pads."""

    def __init__(self, image_tokens: int = 5, padding_side: str = "right") -> None:
        self.tokenizer = CharTokenizer()
        self.image_tokens = image_tokens
        self.padding_side = padding_side

    def __call__(self, texts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        assert len(texts) == len(images)
        rows = []
        for text in texts:
            ids = []
            for t in self.tokenizer.encode(text):
                ids += [t] * (self.image_tokens if t == CharTokenizer.image_token_id else 1)
            rows.append(ids)
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if self.padding_side == "right" else slice(width - len(r), width)
            ids[i, sl] = torch.tensor(r)
            mask[i, sl] = 1
        pixels = torch.stack([torch.as_tensor(np.array(im), dtype=torch.float32) for im in images])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def _rows() -> dict[str, list]:
    return {
        "sample_id": ["s0", "s1"],
        "png": [_png((255, 0, 0)), _png((0, 0, 255))],
        "question": ["Which rhythm is shown?", "What does this ECG show?"],
        "options": [["Sinus rhythm", "Atrial fibrillation"], ["Normal", "LBBB", "RBBB"]],
        "target_text": ["The answer is B. Irregular RR.", "The answer is A. Normal axis and QRS."],
        "answer_letter": ["B", "A"],
    }


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_trains_only_on_the_answer(padding_side: str) -> None:
    processor = FakeProcessor(padding_side=padding_side)
    rows = _rows()
    out = Collator(processor)(rows)
    ids, mask, labels = out["input_ids"], out["attention_mask"], out["labels"]
    assert labels.shape == ids.shape
    tok = processor.tokenizer
    for i, target in enumerate(rows["target_text"]):
        kept = labels[i][labels[i] != IGNORE_INDEX].tolist()
        # Exactly the answer: a space, the target text and the closing </s>.
        assert tok.decode(kept) == " " + target + "</s>"
        # Labels, where kept, equal the inputs at the same positions (no shift here: the
        # model shifts).
        pos = (labels[i] != IGNORE_INDEX).nonzero().flatten()
        assert torch.equal(ids[i, pos], labels[i, pos])
        # Image tokens, padding and every prompt token are masked.
        assert (labels[i][ids[i] == CharTokenizer.image_token_id] == IGNORE_INDEX).all()
        assert (labels[i][mask[i] == 0] == IGNORE_INDEX).all()
        prompt_len = len(tok.encode(build_prompt(rows["question"][i], rows["options"][i]))) + (
            processor.image_tokens - 1
        )
        real = mask[i].nonzero().flatten()
        assert (labels[i, real[:prompt_len]] == IGNORE_INDEX).all()
    assert out["pixel_values"].shape[0] == 2


def test_collator_refuses_a_prompt_that_is_not_a_token_prefix() -> None:
    class MergingTokenizer(CharTokenizer):
        # Merges ":" + " " into one token, so the prompt's last token changes once text follows.
        def encode(self, text: str) -> list[int]:
            ids = super().encode(text)
            out: list[int] = []
            for t in ids:
                if out and out[-1] == ord(":") + 10 and t == ord(" ") + 10:
                    out[-1] = 9
                else:
                    out.append(t)
            return out

    processor = FakeProcessor()
    processor.tokenizer = MergingTokenizer()
    with pytest.raises(RuntimeError, match="prefix"):
        Collator(processor)(_rows())


BASE = {"model_dir": "m", "data_dir": "d"}


def test_config_rejects_unknown_keys_by_name() -> None:
    with pytest.raises(ConfigError, match="lora_rank"):
        config_from_dict(TrainConfig, {**BASE, "lora_rank": 4})


def test_config_rejects_impossible_global_batch() -> None:
    with pytest.raises(ConfigError, match="global_batch_size .* 2 x 2 x 3 = 12, got 16"):
        TrainConfig(**BASE, per_device_batch_size=2, num_workers=2,
                    gradient_accumulation_steps=3, global_batch_size=16)
    assert TrainConfig(**BASE, per_device_batch_size=2, num_workers=2,
                       gradient_accumulation_steps=3, global_batch_size=12).derived_batch_size() == 12


@pytest.mark.parametrize(
    "field, value",
    [
        ("lora_bias", "some"),
        ("per_device_batch_size", 0),
        ("checkpoint_score_attribute", "train_loss"),
        ("checkpoint_score_order", "up"),
        ("warmup_steps", 1000),
        ("deepspeed_config", "zero2.yaml"),
        ("val_split", "train"),
        ("collate_ahead", -1),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**BASE, **{field: value})


def test_fail_at_step_needs_a_marker() -> None:
    with pytest.raises(ConfigError, match="fail_marker"):
        TrainConfig(**BASE, max_steps=10, fail_at_step=3)


def test_shipped_configs_load() -> None:
    for name in ("train_pulse_lora.yaml", "train_tiny_cpu.yaml"):
        path = REPO / "configs" / name
        assert path.read_text().startswith("#"), f"{name} must open with its command"
        config = load_config(TrainConfig, path)
        assert (config.lora_r, config.lora_alpha, config.lora_bias) == (4, 8, "lora_only")
        assert set(config.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert (REPO / config.deepspeed_config).is_file()
    assert "ray job submit --working-dir . -- python -m jobs.train --config configs/train_pulse_lora.yaml" in (
        REPO / "configs" / "train_pulse_lora.yaml"
    ).read_text()
    gpu = load_config(TrainConfig, REPO / "configs" / "train_pulse_lora.yaml")
    assert (gpu.num_workers, gpu.use_gpu) == (4, True)
    # The values its header attributes to LLaVA's LoRA script, and the batch it states.
    assert (gpu.learning_rate, gpu.weight_decay) == (2e-4, 0.0)
    assert gpu.warmup_steps == round(0.03 * gpu.max_steps)
    assert gpu.derived_batch_size() == 64 and gpu.gradient_checkpointing


def test_deepspeed_precision_follows_the_device() -> None:
    config = TrainConfig(**BASE, per_device_batch_size=2, gradient_accumulation_steps=3)
    base = {"zero_optimization": {"stage": 2}}
    cpu = resolve_deepspeed_config(base, config, use_gpu=False)
    gpu = resolve_deepspeed_config(base, config, use_gpu=True)
    assert cpu["bf16"]["enabled"] is False and gpu["bf16"]["enabled"] is True
    assert cpu["train_batch_size"] == 2 * 2 * 3
    assert base == {"zero_optimization": {"stage": 2}}


FINDINGS = (
    ("SR", "Sinus rhythm", "Regular P waves precede every QRS complex."),
    ("AF", "Atrial fibrillation", "Irregularly irregular RR intervals without P waves."),
    ("LBBB", "Left bundle branch block", "Broad QRS with a notched R wave in V6."),
    ("RBBB", "Right bundle branch block", "RSR' pattern in V1 and a broad S wave in V6."),
)


def tiny_rows(split: str, n: int, image_px: tuple[int, int] = (96, 64)) -> list[dict]:
    """``n`` MCQ rows with the prepared data set's columns and PIL-drawn traces."""
    from PIL import ImageDraw

    from ecgvlm.prompt import conversation_json, format_target

    rows = []
    for i in range(n):
        k = (i + (split != "train")) % len(FINDINGS)
        w, h = image_px
        img = Image.new("RGB", (w, h), (255, 250, 250))
        draw = ImageDraw.Draw(img)
        x = [int(w * f) for f in (0.0, 0.31, 0.375, 0.44, 1.0)]
        y = [h // 2, h // 2, int(h * (0.1 + 0.19 * k)), int(h * 0.9), h // 2]
        draw.line(list(zip(x, y)), fill=(0, 0, 0), width=2)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        order = [(k + j) % 4 for j in range(4)] if i % 2 else [(k + 3 * j) % 4 for j in range(4)]
        options = [FINDINGS[j][1] for j in order]
        index = order.index(k)
        letter = "ABCD"[index]
        target = format_target(letter, FINDINGS[k][2])
        question = "Which finding does this ECG show?"
        rows.append({
            "sample_id": f"{split}-{i}", "dataset": "synthetic", "record_id": f"synthetic/{split}{i}",
            "patient_id": f"{split}-p{i}", "labels": [FINDINGS[k][0]], "png": buf.getvalue(),
            "question": question, "options": options,
            "option_labels": [FINDINGS[j][0] for j in order], "answer_index": index,
            "answer_letter": letter, "target_text": target,
            "conversation": conversation_json(question, options, target),
        })
    return rows


def write_prepared(
    root: Path, sizes: dict[str, int], drop: str | None = None, image_px: tuple[int, int] = (96, 64)
) -> Path:
    """A prepared data set in ``ecgvlm prepare``'s layout: Parquet shards plus manifest."""
    import json

    splits = {}
    for split, n in sizes.items():
        rows = tiny_rows(split, n, image_px)
        if drop:
            for row in rows:
                row.pop(drop)
        (root / split).mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows) if rows else pa.table(
            {"sample_id": pa.array([], pa.string()), "png": pa.array([], pa.binary()),
             "question": pa.array([], pa.string()), "options": pa.array([], pa.list_(pa.string())),
             "target_text": pa.array([], pa.string()), "answer_letter": pa.array([], pa.string())})
        pq.write_table(table, root / split / "part-00000.parquet")
        splits[split] = {"n_samples": n, "shards": [{"file": f"{split}/part-00000.parquet", "n_samples": n}]}
    (root / "manifest.json").write_text(json.dumps(
        {"format": "ecgvlm-mcq/1", "render_config_hash": "test-render", "splits": splits}))
    return root


def test_data_checks_name_the_split_and_column(tmp_path: Path) -> None:
    config = TrainConfig(model_dir="m", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="split 'train'.*manifest.json not found"):
        check_training_data(config)
    write_prepared(tmp_path, {"train": 3, "val": 0})
    with pytest.raises(ConfigError, match="split 'val' is empty"):
        check_training_data(config)
    write_prepared(tmp_path, {"train": 3, "val": 2}, drop="target_text")
    with pytest.raises(ConfigError, match="split 'train'.*target_text"):
        check_training_data(config)
    write_prepared(tmp_path, {"train": 3})
    with pytest.raises(ConfigError, match="split 'val'.*not in"):
        check_training_data(config)
    write_prepared(tmp_path, {"train": 3, "val": 2})
    summary = check_training_data(config)
    assert summary.rows == {"train": 3, "val": 2}
    assert summary.label_set == ("AF", "LBBB", "RBBB", "SR")
    assert summary.render_config_hash == "test-render"
    assert set(REQUIRED_COLUMNS) <= set(pq.ParquetFile(tmp_path / "val" / "part-00000.parquet").schema_arrow.names)


def test_the_drivers_checks_import_neither_torch_nor_transformers(
    tmp_path: Path, tiny_pulse_dir: Path
) -> None:
    """The checks a training or search driver makes before Ray starts (data, model folder, run
    folder) read the checkpoint's config, weights' keys and tokenizer without importing torch
    or transformers (with them the checks took 5.3-5.7 s here, 0.6-0.7 s without), and still
    name a broken checkpoint."""
    write_prepared(tmp_path / "prepared", {"train": 3, "val": 2})
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pulse_dir, broken)
    (broken / "tokenizer.model").unlink()
    code = (
        "import sys; from ecgvlm.train import TrainConfig; "
        "from ecgvlm.train.run import check_inputs; "
        "config = TrainConfig(model_dir=sys.argv[1], data_dir=sys.argv[2], "
        "storage_path=sys.argv[3]); "
        "check_inputs(config, resume=False); "
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'peft') "
        "if m in sys.modules)); "
        "import dataclasses; "
        "check_inputs(dataclasses.replace(config, model_dir=sys.argv[4]), resume=False)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_pulse_dir), str(tmp_path / "prepared"),
         str(tmp_path / "runs"), str(broken)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.stdout.splitlines()[:1] == ["[]"], done.stdout + done.stderr[-2000:]
    assert done.returncode == 1 and "ConfigError" in done.stderr
    assert f"model_dir {broken}:" in done.stderr and "tokenizer.model" in done.stderr


def test_collator_masks_the_real_pulse_prompt(tiny_pulse_dir: Path) -> None:
    """With the tiny PULSE processor (sentencepiece, -200 image token, left padding)."""
    from ecgvlm.model import IMAGE_TOKEN_INDEX, load_pulse

    model, processor = load_pulse(tiny_pulse_dir)
    rows = tiny_rows("train", 2)
    batch = {k: [r[k] for r in rows] for k in REQUIRED_COLUMNS}
    out = Collator(processor)(batch)
    ids, labels = out["input_ids"], out["labels"]
    tok = processor.tokenizer
    for i, row in enumerate(rows):
        kept = labels[i][labels[i] != IGNORE_INDEX].tolist()
        assert kept[-1] == tok.eos_token_id
        assert tok.decode(kept).strip() == row["target_text"]
        assert labels[i][ids[i] == IMAGE_TOKEN_INDEX].eq(IGNORE_INDEX).all()
    loss = model(**out).loss
    assert torch.isfinite(loss)


def test_val_subset_is_seeded_and_keeps_each_data_sets_share() -> None:
    from ecgvlm.train import stratified_sample

    # Sorted by record id, as prepared splits are: one source after another.
    groups = ["chapman"] * 60 + ["cpsc2018"] * 30 + ["mitbih"] * 10
    ids = [f"{g}/{i:03d}" for i, g in enumerate(groups)]
    chosen = stratified_sample(ids, groups, 20, seed=0)
    counts = {g: sum(c.startswith(g) for c in chosen) for g in ("chapman", "cpsc2018", "mitbih")}
    assert counts == {"chapman": 12, "cpsc2018": 6, "mitbih": 2}
    assert chosen == stratified_sample(ids, groups, 20, seed=0)
    assert chosen != stratified_sample(ids, groups, 20, seed=1)
    assert stratified_sample(ids, groups, 500, seed=0) == sorted(ids)


def test_resume_refuses_a_changed_learning_rate_schedule(tmp_path: Path) -> None:
    from ecgvlm.config import save_config
    from ecgvlm.train import check_run_dir

    config = TrainConfig(model_dir="m", data_dir="d", storage_path=str(tmp_path), run_name="r",
                         max_steps=1000, learning_rate=1e-4, warmup_steps=10)
    run_dir = Path(config.run_dir())
    run_dir.mkdir()
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")  # a started run
    save_config(config, run_dir / "train_config.yaml")
    check_run_dir(config, resume=True)  # the same schedule resumes
    check_run_dir(dataclasses.replace(config, eval_every_steps=7), resume=True)
    for name, value in (("max_steps", 2000), ("learning_rate", 2e-4), ("warmup_steps", 0)):
        with pytest.raises(ConfigError, match=f"--resume: {name} = .* differs from the run's"):
            check_run_dir(dataclasses.replace(config, **{name: value}), resume=True)
    # What the evaluations measure: the run's checkpoints are ranked against each other by
    # them, so a bigger val subset on resume would compare accuracies of two subsets.
    for name, value in (("eval_max_samples", 512), ("seed", 1), ("val_split", "test"),
                        ("eval_max_new_tokens", 64), ("checkpoint_score_attribute", "val_loss"),
                        ("checkpoint_score_order", "min")):
        with pytest.raises(ConfigError, match=re.escape(
                f"--resume: {name} = {value!r} differs from the run's ") + ".*ranked against"):
            check_run_dir(dataclasses.replace(config, **{name: value}), resume=True)


def test_a_stopped_runs_hint_says_what_its_rerun_will_accept(tmp_path: Path) -> None:
    from ecgvlm.cli import _train_resume_hint
    from ecgvlm.train import check_run_dir

    config = TrainConfig(model_dir="m", data_dir="d", storage_path=str(tmp_path), run_name="r")
    run_dir = tmp_path / "r"
    # Stopped before Ray Train recorded the run: the same command again; --resume is refused.
    assert _train_resume_hint(config) == (
        f"no checkpoint was recorded in {run_dir} yet: rerun the same command")
    with pytest.raises(ConfigError, match="--resume: no run 'r' to resume"):
        check_run_dir(config, resume=True)
    run_dir.mkdir()
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")  # recorded
    assert _train_resume_hint(config) == (
        f"rerun with --resume to continue from the last checkpoint {run_dir} recorded")
    with pytest.raises(ConfigError, match="pass --resume to continue it"):
        check_run_dir(config, resume=False)


def test_resume_refuses_data_prepared_again_or_other_base_weights(tmp_path: Path) -> None:
    from ecgvlm.train.data import DataSummary
    from ecgvlm.train.run import RUN_INPUTS, check_run_dir, run_inputs

    config = TrainConfig(model_dir=str(tmp_path / "model"), data_dir=str(tmp_path / "data"),
                         storage_path=str(tmp_path / "runs"), run_name="r")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights of the run's start")
    summary = DataSummary({}, data_hash="m1")
    run_dir = Path(config.run_dir())
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")  # a started run
    (run_dir / RUN_INPUTS).write_text(json.dumps(run_inputs(config, summary)))
    check_run_dir(config, resume=True, inputs=run_inputs(config, summary))
    with pytest.raises(ConfigError) as raised:
        check_run_dir(config, resume=True, inputs=run_inputs(config, DataSummary({}, data_hash="m2")))
    assert str(raised.value).startswith(
        f"--resume: the prepared data in data_dir {tmp_path / 'data'} are not those the run "
        "started on (data_hash m1 then, m2 now; ")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights of another checkpoint")
    with pytest.raises(ConfigError, match=re.escape(
            f"--resume: the weights in model_dir {tmp_path / 'model'} are not those the run "
            "started on (model_fingerprint ")):
        check_run_dir(config, resume=True, inputs=run_inputs(config, summary))


def test_an_output_dir_whose_replacement_would_delete_something_is_refused(tmp_path: Path):
    """The adapter replaces ``output_dir`` whole: ``output_dir=runs/train`` (the runs' own
    storage_path) deleted every run's checkpoints when the run ended."""
    from ecgvlm.train.run import check_output_dir

    runs, data = tmp_path / "runs" / "train", tmp_path / "runs" / "prepared"
    (runs / "earlier-run").mkdir(parents=True)
    (runs / "earlier-run" / "checkpoint_manager_snapshot.json").write_text("{}")
    data.mkdir()
    inputs = {"storage_path": str(runs), "data_dir": str(data), "model_dir": "s3://b/pulse"}
    check_output_dir(str(runs / "new-adapter"), inputs)  # a new folder
    (tmp_path / "empty").mkdir()
    check_output_dir(str(tmp_path / "empty"), inputs)
    adapter = tmp_path / "adapter"  # an earlier run's adapter: replaced, as before
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"w")
    check_output_dir(str(adapter), inputs)
    for output in (runs, f"{runs}/", tmp_path / "runs", tmp_path):  # it, or a folder above it
        with pytest.raises(ConfigError) as raised:
            check_output_dir(str(output), inputs)
        assert str(raised.value) == (
            f"output_dir {output} holds storage_path {runs}: the adapter replaces that folder "
            "whole, which would delete it; give the adapter a folder of its own "
            "(configs/train_tiny_cpu.yaml: runs/train/tiny-cpu-adapter)")
    with pytest.raises(ConfigError, match=r"output_dir s3://b holds model_dir s3://b/pulse"):
        check_output_dir("s3://b", inputs)
    # A folder of something else: its files would go.
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "sub/e.txt"):
        (notes / name).write_text("x")
    with pytest.raises(ConfigError) as raised:
        check_output_dir(str(notes), inputs)
    assert str(raised.value) == (
        f"output_dir {notes} already holds files (a.txt, b.txt, c.txt, d.txt, ...) and no "
        "adapter: the adapter replaces that folder whole; give a new folder, or an adapter's to "
        "replace")
    assert len(list(notes.rglob("*.txt"))) == 5


def test_a_killed_workers_checkpoint_folder_is_deleted_by_the_next_checkpoint(tmp_path: Path):
    """A worker killed while Ray Train took its checkpoint (an ASHA-stopped trial, Ctrl-C)
    left its staging folder in /tmp: 33 of them after a day of this project's runs."""
    import os
    import signal

    from ecgvlm.train.loop import STAGING_PREFIX, staging_dir

    # A worker that creates its folder as _save_checkpoint does, writes into it and is killed.
    worker = ("import os, pathlib, signal\n"
              "from ecgvlm.train.loop import staging_dir\n"
              f"d = staging_dir(4, 0, root={str(tmp_path)!r})\n"
              "pathlib.Path(d, 'rng_state_rank0.pt').write_bytes(b'x' * 1000)\n"
              "print(d, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True,
                            cwd=REPO, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    orphan = Path(killed.stdout.strip())
    assert orphan.parent == tmp_path and orphan.is_dir()
    mine = Path(staging_dir(2, 1, root=str(tmp_path)))  # a live worker's, being uploaded
    old_style = tmp_path / f"{STAGING_PREFIX}s2-r0-abcd"  # no process id: not ours to judge
    dead_pid = orphan.name.removeprefix(STAGING_PREFIX).split("-")[0]  # "p<id>"
    not_a_folder = tmp_path / f"{STAGING_PREFIX}{dead_pid}-s9-r0-x"
    other = tmp_path / "unrelated"
    for folder in (old_style, other):
        folder.mkdir()
    not_a_folder.write_text("")

    new = Path(staging_dir(6, 0, root=str(tmp_path)))
    assert not orphan.exists()
    assert new.name.startswith(f"{STAGING_PREFIX}p{os.getpid()}-s6-r0-")
    assert all(p.exists() for p in (mine, old_style, not_a_folder, other, new))


def test_checkpoint_rank_breaks_accuracy_ties_by_loss_and_puts_nan_last() -> None:
    from ecgvlm.train.config import checkpoint_rank

    tied_lower_loss = {"val_accuracy": 0.5, "val_loss": 6.28}
    tied_higher_loss = {"val_accuracy": 0.5, "val_loss": 6.31}
    more_accurate = {"val_accuracy": 0.51, "val_loss": 900.0}
    diverged = {"val_accuracy": 0.9, "val_loss": float("nan")}
    assert checkpoint_rank(tied_lower_loss) > checkpoint_rank(tied_higher_loss)
    assert checkpoint_rank(more_accurate) > checkpoint_rank(tied_lower_loss)
    assert checkpoint_rank(diverged) == float("-inf")
    assert checkpoint_rank(tied_lower_loss, "val_loss", "min") == -6.28
    # Ranked for the least accurate (order min), ties still go to the lower loss.
    assert checkpoint_rank(tied_lower_loss, "val_accuracy", "min") > checkpoint_rank(
        tied_higher_loss, "val_accuracy", "min")


def test_the_exported_adapter_is_the_tied_checkpoint_of_lower_loss(tmp_path: Path, capsys) -> None:
    """Seen in a search of configs/tune_tiny_cpu.yaml: steps 2 and 3 of the best trial both
    had val_accuracy 0.0; the table named step 3 (lower loss), Ray Train's
    get_best_checkpoint gave step 2 (the earliest), whose adapter was exported."""
    import ray.train

    from ecgvlm.train.run import _export_best_adapter

    kept = []
    for step, loss in ((2, 6.31), (3, 6.28), (4, 6.30)):
        adapter = tmp_path / f"checkpoint_step_{step:06d}" / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "step.txt").write_text(str(step))
        # Ray Train's order: best first by the attribute, ties in the order they were taken.
        kept.append((ray.train.Checkpoint.from_directory(str(adapter.parent)),
                     {"step": step, "val_accuracy": 0.0, "val_loss": loss}))
    result = ray.train.Result(metrics={}, checkpoint=kept[-1][0], error=None,
                              path=str(tmp_path), best_checkpoints=kept)
    # Ray Train's own choice: the earliest of the tie.
    assert result.get_best_checkpoint("val_accuracy", "max") is kept[0][0]
    config = TrainConfig(model_dir="m", data_dir="d", output_dir=str(tmp_path / "out"))
    _export_best_adapter(config, result)
    assert (tmp_path / "out" / "step.txt").read_text() == "3"
    _export_best_adapter(dataclasses.replace(config, checkpoint_score_attribute="val_loss",
                                             checkpoint_score_order="min"), result)
    assert (tmp_path / "out" / "step.txt").read_text() == "3"
    assert "checkpoint_step_000003" in capsys.readouterr().out
