"""Frame preprocessing equals the checkpoint processor's: PIL bicubic on uint8 to S x S, rescale, normalise.

The reference is built from PIL and numpy alone (what transformers' slow ``LlavaOnevisionVideoProcessor``
does per frame: ``image_transforms.resize`` = numpy -> PIL -> ``resize((S, S), BICUBIC)`` -> numpy uint8,
then ``rescale(1/255)`` in float64 -> float32, then ``normalize`` in float32), and, where the installed
transformers has it, from the PIL-backend LLaVA-OneVision image processor class itself (no Hub, no
torchvision). Frames are decoded from a real H.264 file, so they carry codec noise and chroma edges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mukv.errors import ConfigError
from mukv.video import Mp4Source, write_mp4
from mukv.video.preprocess import FrameResize, frame_resize, preprocess_frames, resize_frames

VISION = 384  # LLaVA-OneVision's vision size
CKPT_MEAN = CKPT_STD = (0.5, 0.5, 0.5)  # llava-hf/llava-onevision-*-ov-hf preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_*: unequal channels catch mix-ups
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def scene(n: int, h: int, w: int) -> np.ndarray:
    """Gradients, hard-edged blocks that move and a little noise: resampling differences show at the edges."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.empty((n, h, w, 3), np.uint8)
    for k in range(n):
        img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy + 9 * k) % 256], -1).astype(np.int32)
        img[h // 4: h // 2, 10 + 7 * k: 50 + 7 * k] = (250, 20, 40)
        img[(yy - h // 2) ** 2 + (xx - w // 2 - 5 * k) ** 2 < (h // 5) ** 2] = (10, 240, 230)
        img[::9] = 255 - img[::9]  # thin stripes
        img += rng.integers(-6, 7, img.shape)
        frames[k] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def decoded(tmp_path_factory: pytest.TempPathFactory, h: int, w: int) -> np.ndarray:
    path = tmp_path_factory.mktemp("pre") / f"scene_{h}x{w}.mp4"
    write_mp4(path, scene(6, h, w), 2)
    frames = Mp4Source(path, sample_fps=2).frames(0, 6)
    assert frames.dtype == np.uint8 and frames.shape == (6, h, w, 3)
    return frames


@pytest.fixture(scope="module")
def wide_frames(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return decoded(tmp_path_factory, 120, 200)  # not square: the video path ignores the aspect ratio


@pytest.fixture(scope="module")
def square_frames(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return decoded(tmp_path_factory, 160, 160)


def pil_reference(frames: np.ndarray, size: int, mean, std) -> np.ndarray:
    """(n, 3, size, size) float32, built with PIL and numpy only, step by step as transformers does."""
    out = []
    for frame in frames:
        img = np.asarray(Image.fromarray(frame).resize((size, size), Image.BICUBIC))  # uint8 in, uint8 out
        x = (img.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
        out.append(x.transpose(2, 0, 1))
    return np.stack(out)


@pytest.mark.parametrize("mean,std", [(CKPT_MEAN, CKPT_STD), (CLIP_MEAN, CLIP_STD)])
def test_preprocess_equals_pil_reference_on_decoded_frames(wide_frames, mean, std):
    got = preprocess_frames(wide_frames, VISION, mean, std)
    assert got.dtype == torch.float32 and got.shape == (6, 3, VISION, VISION)
    np.testing.assert_allclose(got.numpy(), pil_reference(wide_frames, VISION, mean, std), rtol=0, atol=1e-6)


def test_resize_is_uint8_pil_bicubic_and_skips_frames_at_the_size(wide_frames, square_frames):
    small = resize_frames(wide_frames, VISION)
    assert small.dtype == np.uint8 and small.shape == (6, VISION, VISION, 3)
    for frame, got in zip(wide_frames, small, strict=True):
        np.testing.assert_array_equal(got, np.asarray(Image.fromarray(frame).resize((VISION, VISION),
                                                                                    Image.BICUBIC)))
    assert resize_frames(square_frames, 160) is square_frames  # already at the size: untouched, no copy


def test_video_llm_preprocess_is_the_processor_path(tiny_llm, wide_frames):
    """The model's own entry point (tiny: 112 px, mean = std = 0.5), on decoded frames of another size."""
    size = tiny_llm.image_size
    got = tiny_llm.preprocess(wide_frames)
    assert tiny_llm.resize is FrameResize.pil_uint8
    np.testing.assert_allclose(got.numpy(), pil_reference(wide_frames, size, (0.5,) * 3, (0.5,) * 3),
                               rtol=0, atol=1e-6)


def test_torch_float_option_is_the_previous_resize_and_differs(wide_frames):
    """torch_float: float bicubic + antialias, never rounded; on these frames it is not the processor's."""
    x = torch.from_numpy(wide_frames).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(VISION, VISION), mode="bicubic", antialias=True).clamp(0, 255)
    want = (x / 255.0 - 0.5) / 0.5
    got = preprocess_frames(wide_frames, VISION, CKPT_MEAN, CKPT_STD, "torch_float")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    ref = pil_reference(wide_frames, VISION, CKPT_MEAN, CKPT_STD)
    assert np.abs(got.numpy() - ref).max() > 2 / 255  # a few uint8 levels off at edges: the test can tell


def test_frames_at_the_vision_size_are_not_resized_by_either_mode(square_frames):
    """Nano and tiny streams are rendered at the vision size: their pixels are the same in both modes."""
    pil = preprocess_frames(square_frames, 160, CLIP_MEAN, CLIP_STD, FrameResize.pil_uint8)
    flt = preprocess_frames(square_frames, 160, CLIP_MEAN, CLIP_STD, FrameResize.torch_float)
    assert torch.equal(pil, flt)
    x = torch.from_numpy(square_frames).permute(0, 3, 1, 2).float() / 255.0
    want = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.equal(pil, want)


def test_bad_inputs_and_modes_are_refused(tiny_llm, square_frames):
    with pytest.raises(ValueError, match="pil_uint8, torch_float"):
        frame_resize("bilinear")
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frames(square_frames.astype(np.float32), 160, CKPT_MEAN, CKPT_STD)
    with pytest.raises(ValueError, match=r"\(n, H, W, 3\)"):
        preprocess_frames(square_frames[..., :2], 160, CKPT_MEAN, CKPT_STD)
    from mukv.models.loading import load_video_llm

    with pytest.raises(ConfigError, match="model.resize"):
        load_video_llm("tiny", None, device="cpu", dtype="float32", resize="bilinear")


def test_model_resize_is_a_schema_field_checked_at_compose_time():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    from mukv.config import register_configs

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        assert compose("eval", overrides=["model=llava_ov_0.5b"]).model.resize is FrameResize.pil_uint8
        assert compose("eval", overrides=["model.resize=torch_float"]).model.resize is FrameResize.torch_float
        with pytest.raises((ConfigCompositionException, ValidationError)) as err:
            compose("eval", overrides=["model.resize=bilinear"])
    assert "resize" in str(err.value) + str(err.value.__cause__)


# ------------------------------------------------------------- the checkpoint's processor class itself
def _pil_processor(mean, std):
    mod = pytest.importorskip("transformers.models.llava_onevision.image_processing_pil_llava_onevision",
                              reason="this transformers has no PIL-backend LLaVA-OneVision image processor")
    return mod.LlavaOnevisionImageProcessorPil(size={"height": VISION, "width": VISION}, image_mean=list(mean),
                                               image_std=list(std))


@pytest.mark.parametrize("mean,std", [(CKPT_MEAN, CKPT_STD), (CLIP_MEAN, CLIP_STD)])
def test_equals_transformers_processor_preprocess(square_frames, mean, std):
    """The class's whole ``preprocess`` on square decoded frames given as one multi-image sample (no anyres
    patches; padding to square is a no-op): resize to 384 x 384 with its default resample, rescale,
    normalise."""
    proc = _pil_processor(mean, std)
    assert int(proc.resample) == int(Image.BICUBIC)
    out = proc.preprocess([list(square_frames)], return_tensors="np")["pixel_values"]
    want = np.asarray(out).reshape(len(square_frames), 3, VISION, VISION)
    got = preprocess_frames(square_frames, VISION, mean, std)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)


def test_equals_transformers_processor_steps_on_wide_frames(wide_frames):
    """The video processor's per-frame steps with this class's own resize / rescale / normalise on a
    non-square frame: straight to (384, 384), aspect ratio not kept, as the slow video processor does."""
    from transformers.image_utils import SizeDict

    proc = _pil_processor(CLIP_MEAN, CLIP_STD)
    want = []
    for frame in wide_frames:
        chw = np.ascontiguousarray(frame.transpose(2, 0, 1))
        x = proc.resize(chw, SizeDict(height=VISION, width=VISION), resample=proc.resample)
        assert x.dtype == np.uint8  # uint8 in, uint8 out
        want.append(proc.normalize(proc.rescale(x, proc.rescale_factor), proc.image_mean, proc.image_std))
    got = preprocess_frames(wide_frames, VISION, CLIP_MEAN, CLIP_STD)
    np.testing.assert_allclose(got.numpy(), np.stack(want), rtol=0, atol=1e-6)
