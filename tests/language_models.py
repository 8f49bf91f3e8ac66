"""Small causal language models and prompts for the generation tests."""

import numpy as np

import keras_favor

VOCABULARY = 61
MAX_LENGTH = 96


def language_model(attention="favor", api="functional", num_layers=2, **kwargs):
    model = keras_favor.build_performer(
        VOCABULARY,
        MAX_LENGTH,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        task="language_model",
        num_features=16,
        chunk_size=8,
        seed=0,
        attention=attention,
        api=api,
        **kwargs,
    )
    # Larger weights than the initial ones make confident, varied
    # predictions, so that greedy decoding does not settle on one token.
    rng = np.random.default_rng(5)
    model.set_weights(
        [
            w
            if w.ndim < 2 or w.dtype != np.float32
            else 3
            * rng.normal(size=w.shape).astype("float32")
            / np.sqrt(w.shape[-2])
            for w in model.get_weights()
        ]
    )
    return model


def left_padded_prompts():
    """Three prompts of 9, 6 and 3 tokens, left-padded to 9."""
    prompt = np.random.default_rng(1).integers(1, VOCABULARY, size=(3, 9))
    prompt[1, :3] = 0
    prompt[2, :6] = 0
    return prompt.astype("int32")


def greedy_by_full_passes(model, prompt, num_tokens):
    tokens = prompt
    for _ in range(num_tokens):
        logits = np.asarray(model(tokens), "float32")
        next_token = logits[:, -1].argmax(axis=-1).astype("int32")
        tokens = np.concatenate([tokens, next_token[:, None]], axis=1)
    return tokens
