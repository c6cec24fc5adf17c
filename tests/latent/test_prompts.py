"""The prompt cache against transformers and diffusers: the context is the text encoder's last
hidden state of the padded token ids, the very tensors StableDiffusionPipeline.encode_prompt gives
(the empty prompt's is its unconditional context); deduplicated, keyed, never stale."""

from __future__ import annotations

import pytest
import torch

from difflora.latent import CacheError, cache_prompts, encode_prompts, open_prompt_cache
from tiny_latent import MAX_LENGTH, tiny_text_encoder, tiny_tokenizer, tiny_vae

pytest.importorskip("transformers")
CAPTIONS = ["a cat", "a dog", "a cat", "", "the sat cat", "a dog"]


@pytest.fixture
def parts(tmp_path):
    return tiny_tokenizer(tmp_path / "tokenizer"), tiny_text_encoder()


def test_the_context_is_the_last_hidden_state_of_the_padded_ids(parts, tmp_path):
    tokenizer, encoder = parts
    cache = cache_prompts(tokenizer, encoder, CAPTIONS, root=tmp_path, shard_size=2)
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        reference = encoder(ids.input_ids).last_hidden_state
    assert reference.shape == (6, MAX_LENGTH, 32)
    torch.testing.assert_close(cache.lookup(CAPTIONS), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(encode_prompts(tokenizer, encoder, CAPTIONS, batch_size=4), reference, atol=1e-6, rtol=0)
    # Distinct captions only, the empty prompt first.
    assert cache.texts == ["", "a cat", "a dog", "the sat cat"] and cache.embeddings.shape[0] == 4
    assert cache.indices(CAPTIONS).tolist() == [1, 2, 1, 0, 3, 2]


def test_it_matches_stable_diffusion_pipelines_encode_prompt(parts, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    tokenizer, encoder = parts
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    prompts = ["a cat", "the sat cat"]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    cache = cache_prompts(tokenizer, encoder, CAPTIONS, root=tmp_path)
    torch.testing.assert_close(cache.lookup(prompts), cond, atol=1e-6, rtol=0)
    torch.testing.assert_close(cache.empty.expand_as(uncond), uncond, atol=1e-6, rtol=0)


def test_the_cache_is_rebuilt_for_another_encoder_or_tokenizer_and_reused_otherwise(parts, tmp_path):
    tokenizer, encoder = parts
    logs: list[str] = []
    first = cache_prompts(tokenizer, encoder, CAPTIONS, root=tmp_path, log=logs.append)
    assert logs
    logs.clear()
    again = cache_prompts(tokenizer, encoder, list(reversed(CAPTIONS)), root=tmp_path, log=logs.append)
    assert again.path == first.path and not logs  # the same distinct captions, in any order
    with torch.no_grad():
        next(encoder.parameters()).view(-1)[0] += 1e-3  # one weight perturbed
    other = cache_prompts(tokenizer, encoder, CAPTIONS, root=tmp_path, log=logs.append)
    assert other.path != first.path and logs
    shorter = tiny_tokenizer(tmp_path / "t2")
    shorter.model_max_length = MAX_LENGTH - 2
    third = cache_prompts(shorter, encoder, CAPTIONS, root=tmp_path)
    assert third.path not in (first.path, other.path) and third.embeddings.shape[1] == MAX_LENGTH - 2
    more = cache_prompts(tokenizer, encoder, [*CAPTIONS, "a bat"], root=tmp_path)
    assert more.path not in (first.path, other.path, third.path)


def test_errors_are_one_line(parts, tmp_path):
    tokenizer, encoder = parts
    cache = cache_prompts(tokenizer, encoder, CAPTIONS, path=tmp_path / "p")
    with pytest.raises(CacheError, match=r"1 caption\(s\) are not in the prompt cache .* \(first: 'a bat'\)"):
        cache.indices(["a cat", "a bat"])
    with pytest.raises(CacheError, match=r"made for another key \(encoder: \w+ there, \w+ here\)"):
        cache_prompts(tokenizer, tiny_text_encoder(seed=1), CAPTIONS, path=tmp_path / "p")
    assert open_prompt_cache(tmp_path / "p").texts == cache.texts


def test_a_built_cache_is_read_without_loading_the_encoder(parts, tmp_path):
    tokenizer, encoder = parts
    built = cache_prompts(tokenizer, encoder, CAPTIONS, root=tmp_path, encoder_id="te-fingerprint")

    def must_not_load():
        raise AssertionError("the text encoder was loaded although the cache exists")

    again = cache_prompts(tokenizer, must_not_load, CAPTIONS, root=tmp_path, encoder_id="te-fingerprint")
    assert torch.equal(again.embeddings, built.embeddings)
