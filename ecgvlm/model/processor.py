"""Turn prompts and PIL images into PULSE's inputs exactly as LLaVA does.

Images (LLaVA ``process_anyres_image`` with a CLIP image processor):

1. choose the canvas in ``image_grid_pinpoints`` that keeps the most of the image's pixels
   after an aspect-preserving downscale, ties broken by the least wasted canvas;
2. resize the image onto that canvas (bicubic, aspect kept, ``ceil`` on the scaled side),
   centre it on black;
3. cut the canvas into CLIP-sized square tiles in raster order;
4. put in front an overview tile: the whole image squashed to one CLIP tile (aspect NOT kept);
5. CLIP-normalise each tile: ``(pixel / 255 - mean) / std`` per channel.

Text (LLaVA ``tokenizer_image_token``): the prompt is split at ``<image>``, each piece is
tokenised with the Llama sentencepiece tokenizer, and the pieces are joined with
``IMAGE_TOKEN_INDEX`` (-200), one BOS in front. The model replaces that one position with all
of the image's feature vectors.

Batches are padded on the LEFT (pad = ``<unk>``, id 0, as PULSE's tokenizer sets it), so that
generation appends new tokens right after every prompt. ``pixel_values`` is zero-padded to the
largest tile count in the batch; the model recovers each image's tile count from
``image_sizes`` (width, height) in PIL order, as LLaVA stores them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

# torch is imported where tensors are made, not here: a checkpoint check (checkpoint.py) reads
# the tokenizer and the preprocessor config on a driver that never imports torch.
if TYPE_CHECKING:
    import torch

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
SPIECE_UNDERLINE = "\u2581"

# Images we accept (PIL converts them to RGB losslessly for our purpose: a palette PNG from the
# renderer, greyscale scans, RGBA screenshots whose alpha is dropped as LLaVA's loader does).
CONVERTIBLE_MODES = ("RGB", "RGBA", "P", "L", "LA", "1", "RGBX", "CMYK", "YCbCr")
MIN_IMAGE_SIDE_PX = 16
MAX_IMAGE_SIDE_PX = 16384
# Beyond this, anyres unpadding would leave rows or columns of zero features.
MAX_ASPECT_RATIO = 32.0

# OpenAI CLIP's normalisation, used by every CLIP image processor PULSE can name.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageInputError(ValueError):
    """An image the processor cannot take (mode, size, aspect ratio); the message says which."""


class PromptError(ValueError):
    """A prompt without exactly one ``<image>`` placeholder, or a batch of mismatched lengths."""


# PIL resampling filters by the number transformers' preprocessor_config.json stores.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# Keys of a CLIPImageProcessor preprocessor_config.json that change no pixels here.
PREPROCESSOR_INERT_KEYS = frozenset(
    {"image_processor_type", "processor_class", "feature_extractor_type", "do_convert_rgb"}
)


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """The CLIP image processor's settings that change pixels.

    Attributes:
        shortest_edge: the overview tile and each CLIP input are resized to this.
        crop_size: CLIP's input side; anyres tiles are this big.
        image_mean: per-channel mean in [0, 1].
        image_std: per-channel standard deviation.
        resample: PIL filter number for CLIP's own resize (3: bicubic); it acts only when
            ``shortest_edge`` differs from ``crop_size`` (anyres tiles are already crop-sized).
        do_rescale: multiply pixels by ``rescale_factor``.
        rescale_factor: 1/255 for CLIP.
        do_normalize: subtract ``image_mean`` and divide by ``image_std``.
    """

    shortest_edge: int = 336
    crop_size: int = 336
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resample: int = 3
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True

    def __post_init__(self) -> None:
        if self.resample not in PIL_RESAMPLE:
            raise ValueError(
                f"resample must be one of {sorted(PIL_RESAMPLE)} (PIL filters), got "
                f"{self.resample!r}"
            )

    @classmethod
    def from_file(cls, path: Path) -> ImagePreprocessConfig:
        """Read a transformers ``preprocessor_config.json`` (CLIPImageProcessor).

        Raises:
            ValueError: a setting that changes pixels but is not implemented, by name.
        """
        data = json.loads(Path(path).read_text())
        size = data.get("size", 336)
        size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        crop = data.get("crop_size", size)
        crop = crop.get("height") if isinstance(crop, dict) else crop
        if data.get("do_resize", True) is False or data.get("do_center_crop", True) is False:
            raise ValueError(f"{path}: do_resize and do_center_crop must be true for CLIP")
        known = {
            "size", "crop_size", "do_resize", "do_center_crop", "image_mean", "image_std",
            "resample", "do_rescale", "rescale_factor", "do_normalize",
        }  # fmt: skip
        unknown = sorted(set(data) - known - PREPROCESSOR_INERT_KEYS)
        if unknown:
            raise ValueError(
                f"{path}: setting(s) not implemented, refusing to ignore them: {', '.join(unknown)}"
            )
        return cls(
            shortest_edge=int(size),
            crop_size=int(crop),
            image_mean=tuple(float(x) for x in data.get("image_mean", CLIP_MEAN)),
            image_std=tuple(float(x) for x in data.get("image_std", CLIP_STD)),
            resample=int(data.get("resample", 3)),
            do_rescale=bool(data.get("do_rescale", True)),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)),
            do_normalize=bool(data.get("do_normalize", True)),
        )

    def to_transformers(self) -> dict[str, Any]:
        """The same settings as a transformers ``preprocessor_config.json`` dict."""
        return {
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": True,
            "image_mean": list(self.image_mean),
            "image_processor_type": "CLIPImageProcessor",
            "image_std": list(self.image_std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"shortest_edge": self.shortest_edge},
        }


def select_best_resolution(
    image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The canvas (width, height) that keeps the most image pixels, then wastes the least."""
    width, height = image_size
    best: tuple[int, int] | None = None
    best_effective, best_wasted = 0, math.inf
    for cand_w, cand_h in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    assert best is not None, "pinpoints are validated non-empty"
    return best


def anyres_grid_shape(
    image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile_px: int
) -> tuple[int, int]:
    """Number of tiles (across, down) that anyres cuts this image into."""
    width, height = select_best_resolution(image_size, pinpoints)
    return width // tile_px, height // tile_px


def num_image_tiles(
    image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile_px: int
) -> int:
    """Tiles CLIP sees for one image: the anyres grid plus the overview tile."""
    across, down = anyres_grid_shape(image_size, pinpoints, tile_px)
    return across * down + 1


def _resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    width, height = image.size
    target_w, target_h = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(resized, ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def check_image(image: Any, index: int = 0) -> Image.Image:
    """Return ``image`` as RGB, or raise ImageInputError saying what is wrong with it."""
    if not isinstance(image, Image.Image):
        raise ImageInputError(
            f"image {index} must be a PIL.Image.Image, got {type(image).__name__}"
        )
    width, height = image.size
    if image.mode not in CONVERTIBLE_MODES:
        raise ImageInputError(
            f"image {index} has mode {image.mode!r}; expected one of {', '.join(CONVERTIBLE_MODES)}"
            " (convert high-bit-depth images to 8-bit RGB first)"
        )
    if min(width, height) < MIN_IMAGE_SIDE_PX or max(width, height) > MAX_IMAGE_SIDE_PX:
        raise ImageInputError(
            f"image {index} is {width}x{height} px; each side must be within "
            f"[{MIN_IMAGE_SIDE_PX}, {MAX_IMAGE_SIDE_PX}]"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageInputError(
            f"image {index} is {width}x{height} px, aspect ratio above {MAX_ASPECT_RATIO:g}"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare by
class PreparedImage:
    """An image already tiled and normalised for the model (``PulseProcessor.prepare_image``),
    so that a batch can take it without doing that work again.

    Attributes:
        pixel_values: (tiles, 3, crop, crop) float32, as ``PulseImageProcessor`` makes them.
        size: the original image's (width, height), which sets its number of image features.
    """

    pixel_values: torch.Tensor
    size: tuple[int, int]


class PulseImageProcessor:
    """LLaVA's anyres preprocessing with CLIP normalisation, in numpy and PIL."""

    def __init__(self, config: ImagePreprocessConfig, pinpoints: Sequence[tuple[int, int]]):
        self.config = config
        self.pinpoints = tuple(tuple(p) for p in pinpoints)
        for w, h in self.pinpoints:
            if w % config.crop_size or h % config.crop_size:
                raise ValueError(
                    f"image_grid_pinpoints entry {(w, h)} is not a multiple of the CLIP tile "
                    f"size {config.crop_size}"
                )
        self._mean = np.asarray(config.image_mean, dtype=np.float32)
        self._std = np.asarray(config.image_std, dtype=np.float32)
        # Rescaling and normalising act on one 8-bit value of one channel at a time, so their
        # result is a table of 256 values per channel, (3, 256): looking a pixel up gives the
        # same float32 bits as the arithmetic, in about a fifth of the time (a PULSE-7B
        # printout's five tiles: docs/serve.md, "Normalising by table").
        every_value = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
        self._value_table = np.ascontiguousarray(self.normalise(every_value).T)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """CLIP's rescale and normalisation of (..., 3) uint8 pixels, as float32."""
        cfg = self.config
        # Same arithmetic order as transformers' rescale (float64 then float32) and normalise.
        if cfg.do_rescale:
            pixels = (pixels * cfg.rescale_factor).astype(np.float32)
        pixels = pixels.astype(np.float32)
        if cfg.do_normalize:
            pixels = (pixels - self._mean) / self._std
        return pixels

    def _clip_tile(self, tile: Image.Image, out: np.ndarray) -> None:
        """One tile as CLIP sees it, written into ``out``, (3, crop, crop) float32."""
        cfg = self.config
        width, height = tile.size
        if min(width, height) != cfg.shortest_edge:
            # CLIPImageProcessor: shortest edge to `shortest_edge`, the other side truncated.
            if width <= height:
                size = (cfg.shortest_edge, int(cfg.shortest_edge * height / width))
            else:
                size = (int(cfg.shortest_edge * width / height), cfg.shortest_edge)
            tile = tile.resize(size, cfg.resample)
        width, height = tile.size
        if (width, height) != (cfg.crop_size, cfg.crop_size):
            left = (width - cfg.crop_size) // 2
            top = (height - cfg.crop_size) // 2
            tile = tile.crop((left, top, left + cfg.crop_size, top + cfg.crop_size))
        # Each channel's plane looked up in its row of the table, straight into ``out``.
        planes = np.asarray(tile, dtype=np.uint8).transpose(2, 0, 1)
        for channel in range(3):
            np.take(self._value_table[channel], planes[channel], out=out[channel])

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        """The overview tile then the anyres grid tiles in raster order, as PIL images."""
        canvas_size = select_best_resolution(image.size, self.pinpoints)
        canvas = _resize_and_pad(image, canvas_size)
        tile_px = self.config.crop_size
        grid = [
            canvas.crop((x, y, x + tile_px, y + tile_px))
            for y in range(0, canvas.size[1], tile_px)
            for x in range(0, canvas.size[0], tile_px)
        ]
        edge = self.config.shortest_edge
        return [image.resize((edge, edge), Image.BICUBIC), *grid]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One image as a (tiles, 3, crop, crop) float32 tensor."""
        import torch

        tiles = self.tiles(image)
        crop = self.config.crop_size
        pixel_values = torch.empty((len(tiles), 3, crop, crop), dtype=torch.float32)
        for tile, out in zip(tiles, pixel_values.numpy()):
            self._clip_tile(tile, out)
        return pixel_values


class LlamaSentencePieceTokenizer:
    """The Llama/Vicuna tokenizer PULSE ships, on sentencepiece alone.

    It reproduces transformers' slow ``LlamaTokenizer`` (what LLaVA loads with
    ``use_fast=False``): special-token strings (``<s>``, ``</s>``, ``<unk>``) in the text become
    their ids; with ``legacy: false`` (Vicuna's setting) one word-boundary marker is put in front
    of the whole text and none after special tokens, with ``legacy: true`` sentencepiece adds
    one in front of every piece between special tokens.
    """

    def __init__(self, directory: Path):
        import sentencepiece as spm

        directory = Path(directory)
        self.source_dir = directory
        model_file = directory / "tokenizer.model"
        if not model_file.is_file():
            raise FileNotFoundError(f"{directory} has no tokenizer.model (sentencepiece)")
        cfg_file = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.legacy = bool(cfg.get("legacy", True))
        self.add_bos_token = bool(cfg.get("add_bos_token", True))
        self.add_eos_token = bool(cfg.get("add_eos_token", False))
        self.model_max_length = int(cfg.get("model_max_length", 4096))
        self._sp = spm.SentencePieceProcessor()
        self._sp.Load(str(model_file))
        self._sp_plain = spm.SentencePieceProcessor()
        if self.legacy:
            self._sp_plain = self._sp
        else:
            # Non-legacy Llama tokenizers switch sentencepiece's dummy prefix off and add the
            # word-boundary marker themselves.
            from sentencepiece import sentencepiece_model_pb2 as pb

            proto = pb.ModelProto()
            proto.ParseFromString(model_file.read_bytes())
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_plain.LoadFromSerializedProto(proto.SerializeToString())

        def token_text(value: Any, default: str) -> str:
            if isinstance(value, dict):
                return str(value.get("content", default))
            return default if value is None else str(value)

        self._refuse_added_tokens(directory, cfg)
        self.unk_token = token_text(cfg.get("unk_token"), "<unk>")
        self.bos_token = token_text(cfg.get("bos_token"), "<s>")
        self.eos_token = token_text(cfg.get("eos_token"), "</s>")
        pad = cfg.get("pad_token")
        # LLaVA's training sets pad to unk for the v1 template; use that when none is saved.
        self.pad_token = token_text(pad, self.unk_token) if pad is not None else self.unk_token
        self.unk_token_id = self._sp.PieceToId(self.unk_token)
        self.bos_token_id = self._sp.PieceToId(self.bos_token)
        self.eos_token_id = self._sp.PieceToId(self.eos_token)
        self.pad_token_id = self._sp.PieceToId(self.pad_token)
        self._special = {
            self.unk_token: self.unk_token_id,
            self.bos_token: self.bos_token_id,
            self.eos_token: self.eos_token_id,
        }
        self._unk_prefix_len = len(self._sp_plain.EncodeAsIds(self.unk_token))

    def _refuse_added_tokens(self, directory: Path, cfg: dict[str, Any]) -> None:
        """Refuse tokens added on top of sentencepiece (LLaVA's tokenizer would split them out
        as single ids and grow the vocabulary; this tokenizer would spell them out)."""
        added = []
        if (directory / "added_tokens.json").is_file():
            added += sorted(json.loads((directory / "added_tokens.json").read_text()))
        for index, entry in (cfg.get("added_tokens_decoder") or {}).items():
            content = entry.get("content") if isinstance(entry, dict) else entry
            if int(index) >= self._sp.GetPieceSize() or self._sp.PieceToId(content) != int(index):
                added.append(str(content))
        extra = cfg.get("additional_special_tokens") or []
        special_map = directory / "special_tokens_map.json"
        if special_map.is_file():
            extra = extra or json.loads(special_map.read_text()).get(
                "additional_special_tokens", []
            )
        added += [t.get("content", "") if isinstance(t, dict) else str(t) for t in extra]
        if added:
            raise ValueError(
                f"{directory}: tokens added beyond tokenizer.model are not supported: "
                f"{', '.join(sorted(set(added)))}"
            )

    def __len__(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def vocab_size(self) -> int:
        return len(self)

    def _split_special(self, text: str) -> list[str | int]:
        parts: list[str | int] = []
        rest = text
        while rest:
            hits = [(rest.find(tok), tok) for tok in self._special if tok in rest]
            if not hits:
                parts.append(rest)
                break
            pos, tok = min(hits, key=lambda h: (h[0], -len(h[1])))
            if pos:
                parts.append(rest[:pos])
            parts.append(self._special[tok])
            rest = rest[pos + len(tok) :]
        return parts

    def _encode_piece(self, text: str) -> list[int]:
        if self.legacy:
            return list(self._sp.EncodeAsIds(text))
        if not text.startswith((SPIECE_UNDERLINE, " ")):
            return list(self._sp_plain.EncodeAsIds(text))
        # sentencepiece would drop a leading space; shield it behind the unk string, then cut.
        ids = list(self._sp_plain.EncodeAsIds(self.unk_token + text))
        return ids[self._unk_prefix_len :]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS in front when the tokenizer config says so."""
        ids: list[int] = []
        if self.legacy or not text:
            parts = self._split_special(text)
        else:
            parts = self._split_special(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
            # A bare marker right before a special token is dropped, as transformers does.
            if len(parts) > 1 and parts[0] == SPIECE_UNDERLINE and isinstance(parts[1], int):
                parts = parts[1:]
        for part in parts:
            ids.extend([part] if isinstance(part, int) else self._encode_piece(part))
        if add_special_tokens:
            ids = ([self.bos_token_id] if self.add_bos_token else []) + ids
            ids = ids + ([self.eos_token_id] if self.add_eos_token else [])
        return ids

    def __call__(
        self, text: str | Sequence[str], add_special_tokens: bool = True
    ) -> dict[str, Any]:
        """transformers-style call: ``input_ids`` and ``attention_mask``, unpadded lists."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        ids_list = [self.encode(t, add_special_tokens) for t in text]
        return {"input_ids": ids_list, "attention_mask": [[1] * len(i) for i in ids_list]}

    def batch_decode(
        self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = True
    ) -> list[str]:
        """``decode`` for each row."""
        return [self.decode(r, skip_special_tokens) for r in rows]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens dropped by default."""
        special = set(self._special.values())
        # Ids past the sentencepiece vocabulary (a model with a larger embedding than its
        # tokenizer, as in the random 7B GPU check) have no text and are skipped.
        pieces = [
            int(i)
            for i in ids
            if 0 <= int(i) < len(self) and not (skip_special_tokens and int(i) in special)
        ]
        return self._sp.DecodeIds(pieces)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, as OpenAI's ``logprobs`` show a token: a
        byte-fallback piece (``<0xE2>``) is that byte, the word-boundary marker a space, a
        control or unknown token (``</s>``, ``<unk>``) its own text; an id past the vocabulary
        stands for nothing."""
        token_id = int(token_id)
        if not 0 <= token_id < len(self):
            return b""
        piece = self._sp.IdToPiece(token_id)
        if self._sp.IsByte(token_id):
            return bytes([int(piece[3:-1], 16)])
        if self._sp.IsControl(token_id) or self._sp.IsUnknown(token_id):
            return piece.encode("utf-8")
        return piece.replace(SPIECE_UNDERLINE, " ").encode("utf-8")

    def tokenize_with_image(self, prompt: str) -> list[int]:
        """LLaVA's ``tokenizer_image_token``: ``<image>`` becomes ``IMAGE_TOKEN_INDEX``."""
        chunks = [self.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
        ids: list[int] = []
        offset = 0
        if chunks and chunks[0] and chunks[0][0] == self.bos_token_id:
            offset = 1
            ids.append(self.bos_token_id)
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[offset:])
        return ids


class PulseProcessor:
    """Prompts with one ``<image>`` each plus PIL images -> PULSE model inputs.

    Attributes:
        tokenizer: the Llama sentencepiece tokenizer.
        image_processor: anyres tiling plus CLIP normalisation.
        padding_side: ``left`` (default; required for batched generation) or ``right``.
    """

    def __init__(
        self,
        tokenizer: LlamaSentencePieceTokenizer,
        image_processor: PulseImageProcessor,
        padding_side: str = "left",
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.padding_side = padding_side

    def pad(self, sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
        """Pad integer sequences to one length on ``padding_side``."""
        import torch

        width = max(len(s) for s in sequences)
        out = torch.full((len(sequences), width), value, dtype=torch.long)
        for row, seq in enumerate(sequences):
            if not seq:
                continue
            if self.padding_side == "left":
                out[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            else:
                out[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        return out

    def encode_prompts(self, prompts: Sequence[str], with_image: bool = True) -> list[list[int]]:
        """Token ids per prompt, each with exactly one ``IMAGE_TOKEN_INDEX`` (``with_image``)
        or none (a question asked without an image)."""
        out = []
        want = 1 if with_image else 0
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise PromptError(f"prompt {i} must be a str, got {type(prompt).__name__}")
            count = prompt.count(IMAGE_TOKEN)
            if count != want:
                raise PromptError(
                    f"prompt {i} must contain exactly one {IMAGE_TOKEN!r} placeholder, has {count}"
                    if with_image else
                    f"prompt {i} is asked without an image but contains {count} {IMAGE_TOKEN!r}"
                )
            out.append(self.tokenizer.tokenize_with_image(prompt))
        return out

    def prepare_image(self, image: Image.Image, index: int = 0) -> PreparedImage:
        """``image`` checked, tiled and normalised once, for any later batch.

        Raises:
            ImageInputError: as :func:`check_image` (``index`` names the image).
        """
        rgb = check_image(image, index)
        return PreparedImage(self.image_processor(rgb), rgb.size)

    def encode_images(
        self, images: Sequence[Image.Image | PreparedImage]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values`` (B, max_tiles, 3, S, S), zero-padded, and ``image_sizes`` (B, 2).
        A :class:`PreparedImage` is taken as it is."""
        import torch

        stacks, sizes = [], []
        for i, image in enumerate(images):
            prepared = image if isinstance(image, PreparedImage) else self.prepare_image(image, i)
            stacks.append(prepared.pixel_values)
            sizes.append(prepared.size)
        max_tiles = max(s.shape[0] for s in stacks)
        pixel_values = torch.zeros((len(stacks), max_tiles, *stacks[0].shape[1:]))
        for row, stack in enumerate(stacks):
            pixel_values[row, : stack.shape[0]] = stack
        return pixel_values, torch.tensor(sizes, dtype=torch.long)

    def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image] | None
    ) -> dict[str, torch.Tensor]:
        """Batch ``prompts`` (one ``<image>`` each) with their ``images``; with ``images``
        None, prompts asked without an image (no ``<image>``: the language model alone).

        Returns:
            ``input_ids`` (B, L) with -200 at the image position, ``attention_mask`` (B, L),
            ``pixel_values`` (B, T, 3, S, S), ``image_sizes`` (B, 2) as (width, height); the
            last two only with images.

        Raises:
            PromptError: a prompt without exactly one ``<image>``, or len(prompts) !=
                len(images), or an empty batch.
            ImageInputError: an image of a mode or size the model cannot take.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if images is None:
            if not prompts:
                raise PromptError("need at least one prompt")
            ids = self.encode_prompts(prompts, with_image=False)
            return {"input_ids": self.pad(ids, self.tokenizer.pad_token_id),
                    "attention_mask": self.pad([[1] * len(r) for r in ids], 0)}
        if isinstance(images, Image.Image):
            images = [images]
        if len(prompts) != len(images) or not prompts:
            raise PromptError(
                f"need one image per prompt and at least one of each, got {len(prompts)} "
                f"prompt(s) and {len(images)} image(s)"
            )
        ids = self.encode_prompts(prompts)
        pixel_values, image_sizes = self.encode_images(images)
        input_ids = self.pad(ids, self.tokenizer.pad_token_id)
        attention_mask = self.pad([[1] * len(s) for s in ids], 0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
        }

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids to text, stopping at the first EOS."""
        ids = [int(i) for i in ids]
        if self.tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(self.tokenizer.eos_token_id)]
        return self.tokenizer.decode(ids).strip()
