"""Images through llama.cpp's libmtmd against transformers' Qwen3.5 vision tower (the oracle):
the projector qwen35-convert writes gives the same image embeddings, and a text+image prompt the
same logits; images come in every form users hand them over, and bad ones are one error."""

import base64
import io
import json

import numpy as np
import pytest

from qwen35.cpus import usable_cpus

# llama.cpp f32 vs transformers float32, relative to the spread of the embeddings: ggml's CPU
# GELU reads an F16 table and sums in another order (measured 5e-4..8e-4 of the spread)
TOL_EMBD_REL_STD = 2e-3
TOL_LOGITS_REL_STD = 2e-3  # as the text model's test (test_converter.py)
SIZES = [(96, 128), (128, 128), (64, 160)]  # height x width: multiples of 32, so neither side resizes


@pytest.fixture(scope="module")
def models(tmp_path_factory, lib_dir):
    """Dense and MoE multimodal checkpoints, converted to F32 with their projectors."""
    from support import tiny

    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("vision")
    out = {}
    for name, kw in (("dense", {}), ("moe", {"moe": True})):
        src = tiny.make_checkpoint(d / name, layout="multimodal", **kw)
        convert(src, d / f"{name}.gguf", file_type="F32", mmproj=d / f"{name}-mmproj.gguf")
        out[name] = (src, d / f"{name}.gguf", d / f"{name}-mmproj.gguf")
    return out


def _image(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(h * 1000 + w).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _reference_tower(src):
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen3_5VisionConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    cfg = json.loads((src / "config.json").read_text())
    tower = Qwen3_5VisionModel(Qwen3_5VisionConfig(**cfg["vision_config"])).eval()
    state = {}
    for f in src.glob("*.safetensors"):
        state.update({k[len("model.visual.") :]: v.to(torch.float32) for k, v in load_file(f).items() if "visual" in k})
    tower.load_state_dict(state, strict=True)
    return tower


def _processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pre = json.loads(json.dumps({"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5] * 3}))
    return Qwen2VLImageProcessorPil(**pre, image_std=[0.5] * 3, do_resize=False)


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_image_embeddings_match_transformers(models, variant):
    import torch

    from qwen35.bindings.model import Model
    from qwen35.bindings.vision import Image

    src, gguf, mmproj = models[variant]
    tower, proc = _reference_tower(src), _processor()
    with Model.load(gguf, n_ctx=512, n_threads=usable_cpus(), kv_type="f32", flash_attn=False, mmproj=mmproj) as m:
        for h, w in SIZES:
            px = _image(h, w)
            inputs = proc(images=[px], return_tensors="pt")
            with torch.no_grad():
                ref = tower(inputs["pixel_values"].float(), inputs["image_grid_thw"]).pooler_output.numpy()
            (chunk,) = [c for c in m.projector.tokenize("<__media__>", [Image.from_array(px)]) if c.image]
            ours = m.projector.encode(chunk)
            assert ours.shape == ref.shape == ((h // 32) * (w // 32), m.n_embd)
            assert chunk.n_pos == max(h, w) // 32  # M-RoPE: the image advances the position by its grid side
            err = np.abs(ours - ref).max()
            assert err <= TOL_EMBD_REL_STD * ref.std(), (h, w, err, ref.std())


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_text_and_image_prompt_logits_match_transformers(models, variant):
    import torch
    from support import tiny
    from transformers import AutoModelForImageTextToText

    from qwen35.bindings.model import Model

    src, gguf, mmproj = models[variant]
    ref_model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    proc = _processor()
    h, w = 64, 160
    px = _image(h, w)
    inputs = proc(images=[px], return_tensors="pt")
    with Model.load(gguf, n_ctx=512, n_threads=usable_cpus(), kv_type="f32", flash_attn=False, mmproj=mmproj) as m:
        before = m.tokenize("<|im_start|>user\n")
        after = m.tokenize("What colour is it?<|im_end|>\n<|im_start|>assistant\n")
        n_img = (h // 32) * (w // 32)
        ids = before + [tiny.VISION_START_TOKEN_ID] + [tiny.IMAGE_TOKEN_ID] * n_img + [tiny.VISION_END_TOKEN_ID] + after
        with torch.no_grad():
            ref = (
                ref_model(
                    input_ids=torch.tensor([ids]),
                    pixel_values=inputs["pixel_values"].float(),
                    image_grid_thw=inputs["image_grid_thw"],
                    mm_token_type_ids=torch.tensor([[int(t == tiny.IMAGE_TOKEN_ID) for t in ids]]),
                )
                .logits[0, -1]
                .numpy()
            )
        text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour is it?<|im_end|>\n<|im_start|>assistant\n"
        m.clear()
        ours, pos = m.eval_prompt(text, [px])
        ours = ours[: ref.shape[0]]
    # positions: text, the image's grid side (not its token count), text
    assert pos == len(before) + 1 + max(h, w) // 32 + 1 + len(after)
    err = np.abs(ours - ref).max()
    assert err <= TOL_LOGITS_REL_STD * ref.std(), (err, ref.std())
    assert ours.argmax() == ref.argmax()
    # and the image matters: without it (the same text) the logits are far from these
    m2 = Model.load(gguf, n_ctx=512, n_threads=usable_cpus(), kv_type="f32", flash_attn=False)
    with m2:
        plain, _ = m2.eval_prompt(text.replace("<|vision_start|><|image_pad|><|vision_end|>", ""))
    assert np.abs(plain[: ref.shape[0]] - ref).max() > 10 * TOL_LOGITS_REL_STD * ref.std()


def test_images_come_in_every_form_users_send(tmp_path):
    from PIL import Image as PILImage

    from qwen35.bindings.vision import load_image

    px = _image(40, 56)
    png = io.BytesIO()
    PILImage.fromarray(px).save(png, format="PNG")
    data = png.getvalue()
    (tmp_path / "a.png").write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    forms = [
        data,
        tmp_path / "a.png",
        str(tmp_path / "a.png"),
        url,
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": str(tmp_path / "a.png")}},
        {"type": "image", "image": str(tmp_path / "a.png")},
        PILImage.fromarray(px),
        px,
    ]
    images = [load_image(f) for f in forms]
    assert all((im.width, im.height) == (56, 40) for im in images)
    assert all(np.array_equal(im.array(), px) for im in images)  # PNG is lossless: the same pixels
    assert len({im.id for im in images}) == 1  # the same picture, whatever the form: one id
    assert load_image(_image(40, 57)).id != images[0].id
    # transparency goes over white, as a viewer shows it
    rgba = np.zeros((8, 8, 4), np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(rgba, "RGBA").save(buf, format="PNG")
    assert (load_image(buf.getvalue()).array() == 255).all()


def test_bad_images_are_one_error_naming_them(tmp_path, monkeypatch):
    from qwen35.bindings import vision
    from qwen35.bindings.vision import ImageError, load_image

    cases = [
        (b"not an image at all", "is not an image Pillow can read"),
        ("data:image/png;base64,@@@", "base64 does not decode"),
        ("data:image/png,rawbytes", "must be data:image/...;base64"),
        ("https://example.com/cat.png", "is remote"),
        (tmp_path / "missing.png", "cannot read image"),
        ("a.png\x00", "cannot read image"),  # found by fuzzing: a NUL byte in a path was a ValueError
        ({"type": "text", "text": "hi"}, "is not an image"),
        ({"type": "image_url"}, "needs"),
        (3.5, "cannot make an image of a float"),
    ]
    for src, expect in cases:
        with pytest.raises(ImageError) as e:
            load_image(src)
        assert expect in str(e.value) and "\n" not in str(e.value), (src, str(e.value))
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 1000)
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(_image(40, 40)).save(buf, format="PNG")
    with pytest.raises(ImageError, match="40x40 pixels"):
        load_image(buf.getvalue())
    monkeypatch.setattr(vision, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(ImageError, match="MiB; images up to"):
        load_image(buf.getvalue())


def test_a_model_without_or_with_a_wrong_projector_says_so(models, tmp_path):
    from qwen35.bindings.model import Model, ModelError

    _, dense, dense_proj = models["dense"]
    with (
        Model.load(dense, n_ctx=256, n_threads=1) as m,
        pytest.raises(ModelError, match="without a vision projector; pass mmproj="),
    ):
        m.eval_prompt("<|vision_start|><|image_pad|><|vision_end|>Hi", [_image(64, 64)])
    with pytest.raises(ModelError, match="is not a vision projector"):
        Model.load(dense, n_ctx=256, n_threads=1, mmproj=dense)
    with pytest.raises(ModelError, match="does not exist"):
        Model.load(dense, n_ctx=256, n_threads=1, mmproj=tmp_path / "nope.gguf")
    with (
        Model.load(dense, n_ctx=256, n_threads=1, mmproj=dense_proj) as m,
        pytest.raises(ModelError, match="places 1 images but 2 were given"),
    ):
        m.eval_prompt("<|vision_start|><|image_pad|><|vision_end|>Hi", [_image(64, 64)] * 2)


# ---------------------------------------------------------------- conversations with images

TOL_REUSE = 1e-4  # as test_session.py: reused and fresh prefills of the same tokens, F32 KV cache


def _png(px: np.ndarray) -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(px).save(buf, format="PNG")
    return buf.getvalue()


def _chat_model(models, n_seq_max=2):
    from qwen35.bindings.model import Model

    _, gguf, mmproj = models["dense"]
    return Model.load(
        gguf, n_ctx=1024, n_seq_max=n_seq_max, n_threads=usable_cpus(), kv_type="f32", flash_attn=False, mmproj=mmproj
    )


@pytest.mark.parametrize("thinking", [False, True])
def test_turns_with_images_reuse_the_cache_and_encode_each_image_once(models, thinking):
    """Turn 2 adds a second image: the first is neither evaluated nor encoded again, and the
    logits after reuse equal a fresh prefill's of the same prompt (on another sequence)."""
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.sampling import SamplingParams
    from qwen35.bindings.session import PromptCache

    greedy = SamplingParams(temperature=0, max_tokens=6)
    img1, img2 = _image(64, 96), _image(96, 64)
    with _chat_model(models) as m:
        chat = Chat(m, enable_thinking=thinking)
        r1 = chat.send("What is in the picture?", greedy, images=[_png(img1)])
        assert chat.cache.images_encoded == 1 and r1.usage.prompt_tokens > 6
        assert chat.messages[-2]["content"][0]["type"] == "image"
        msg, new = chat._user_message(
            [{"type": "text", "text": "And in this one?"}, {"type": "image", "image": img2}], None
        )
        prompt, marks, _, at = chat._prompt([*chat.messages, msg], 6, new)
        reused, u = chat.cache.eval(prompt, marks, at)
        assert chat.cache.images_encoded == 2  # the second image only
        first_image_end = min(at) + at[min(at)].n_tokens
        assert u.reused_tokens >= first_image_end, (u, first_image_end)
        fresh = PromptCache(m, seq_id=1)
        again, f = fresh.eval(prompt, marks, at)
        m.projector.release(next(iter(at.values())))
        assert f.reused_tokens == 0 and fresh.images_encoded == 2
        assert np.abs(reused - again).max() <= TOL_REUSE, np.abs(reused - again).max()
        assert chat.cache.pos(len(prompt)) == fresh.pos(len(prompt)) < len(prompt)  # M-RoPE: fewer positions


def test_a_reply_about_an_image_is_the_same_from_a_resumed_or_a_fresh_chat(models):
    """The second turn's greedy reply (image in the first turn, reused) equals the reply of a
    chat that is sent the same two turns on a fresh sequence after a reset."""
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.sampling import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=8)
    url = "data:image/png;base64," + base64.b64encode(_png(_image(64, 128))).decode()
    turn1 = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]
    with _chat_model(models) as m:
        a = Chat(m, enable_thinking=False)
        a.send(turn1, greedy)
        ra = a.send("What colour?", greedy)
        assert ra.usage.reused_tokens > 0 and a.cache.images_encoded == 1
        b = Chat(m, enable_thinking=False, seq_id=1)
        b.messages = [dict(x) for x in a.messages[:-1]]
        b.images = dict(a.images)
        rb = b.send(None, greedy)
        assert rb.usage.reused_tokens == 0
        assert rb.tokens == ra.tokens


def test_bad_images_in_a_chat_leave_the_conversation_as_it_was(models, tmp_path):
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import Model
    from qwen35.bindings.sampling import SamplingParams
    from qwen35.bindings.vision import ImageError

    greedy = SamplingParams(temperature=0, max_tokens=4)
    with _chat_model(models, n_seq_max=1) as m:
        chat = Chat(m, enable_thinking=False)
        chat.send("Hello.", greedy)
        before = [dict(x) for x in chat.messages]
        for bad, expect in (
            (b"GIF89a not really", "is not an image Pillow can read"),
            (tmp_path / "absent.png", "cannot read image"),
            ("https://example.com/a.png", "is remote"),
        ):
            with pytest.raises(ImageError, match=expect):
                chat.send("Look.", greedy, images=[bad])
            assert chat.messages == before and chat.images == {}
        with pytest.raises(Exception, match="not supported yet"):
            chat.send("Look.", greedy, images=[_png(_image(64, 64))])
            chat.save(tmp_path / "c.qwen35-chat")
    _, gguf, _ = models["dense"]
    with Model.load(gguf, n_ctx=256, n_threads=1) as plain:
        chat = Chat(plain)
        with pytest.raises(ImageError, match="without a vision projector; load it with mmproj="):
            chat.send("Look.", greedy, images=[_png(_image(64, 64))])
        assert chat.messages == []
