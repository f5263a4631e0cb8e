"""Training chat templates: the inference template plus ``{% generation %}`` markers.

Loss is taken on assistant tokens only (TRL's ``assistant_only_loss``), which needs
a chat template that marks them. Most model templates do not, and TRL refuses to
patch some (SmolLM2's ChatML: "patching is not supported"). molting keeps one
marked template per template family here, and checks before training that it
renders token for token what the model's own template renders; if not, training
stops with an error instead of learning a format inference will not use.
The end-of-turn token is inside the markers, so the model learns to stop.
"""

from __future__ import annotations

from molting.errors import ConfigError

CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Phi-3-mini-4k-instruct's template; it ends a conversation without a generation prompt with eos_token.
PHI3 = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\\n' }}"
    "{%- generation %}{{- message['content'] + '<|end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)

# TinyLlama-1.1B-Chat's (Zephyr) template: every turn closes with eos_token.
ZEPHYR = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\\n' }}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

FAMILIES = {"chatml": CHATML, "phi3": PHI3, "zephyr": ZEPHYR}

PROBE = [
    {"role": "system", "content": "Sistema."},
    {"role": "user", "content": "Olá?"},
    {"role": "assistant", "content": "Oi! Tudo bem."},
    {"role": "user", "content": "E agora?"},
    {"role": "assistant", "content": "Agora, isto."},
]


def template_family(chat_template: str | None) -> str:
    """Name the family of an inference chat template: "chatml", "phi3" or "zephyr".

    Raises:
        ConfigError: no template, or one of no known family.
    """
    if not chat_template:
        raise ConfigError("the tokenizer has no chat template; molting needs one to train")
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|assistant|>" in chat_template and "<|end|>" in chat_template:
        return "phi3"
    if "<|assistant|>" in chat_template:
        return "zephyr"
    raise ConfigError(f"unknown chat-template family; known: {sorted(FAMILIES)}")


def training_template(tokenizer) -> str:
    """The marked training template for ``tokenizer``, checked against its own template.

    Raises:
        ConfigError: the family is unknown, or the marked template renders different
            tokens than the model's template on a probe conversation.
    """
    family = template_family(tokenizer.chat_template)
    marked = FAMILIES[family]
    expected = tokenizer.apply_chat_template(PROBE, tokenize=True, return_dict=True)["input_ids"]
    got = tokenizer.apply_chat_template(PROBE, chat_template=marked, tokenize=True, return_dict=True)["input_ids"]
    if list(got) != list(expected):
        raise ConfigError(
            f"molting's {family} training template renders differently from the model's own "
            "chat template; training on it would teach a format inference does not use"
        )
    return marked
