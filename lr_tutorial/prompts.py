"""Identifier handling: y^p -> y^-p, and where the subject's tokens sit in a prompt.

y^p  = "a sks dog on the beach"  (personalized prompt, with the identifier)
y^-p = "a dog on the beach"      (the same prompt without it, for the vanilla model)
"""
from __future__ import annotations

import re


def check_personal_prompt(prompt: str, identifier: str, class_noun: str | None = None) -> None:
    """Raise ValueError unless the prompt holds the identifier (and the class noun, if given)."""
    words = re.findall(r"[\w<>\-]+", prompt.lower())
    if identifier.lower() not in words:
        raise ValueError(
            f"the personalized prompt {prompt!r} does not contain the identifier {identifier!r}; "
            f"write it before the class noun, e.g. 'a {identifier} {class_noun or 'dog'} on the beach'")
    if class_noun and class_noun.lower() not in words:
        raise ValueError(
            f"the prompt {prompt!r} does not contain the class noun {class_noun!r}; Layout-and-"
            f"Retouch needs it for the subject's cross-attention mask: 'a {identifier} {class_noun} ...'")


def strip_identifier(prompt: str, identifier: str) -> str:
    """y^p -> y^-p: drop the identifier word, keep everything else."""
    out = re.sub(rf"(?<![\w<]){re.escape(identifier)}(?![\w>])\s*", "", prompt)
    return " ".join(out.split())


def token_index(tokenizer, prompt: str, word: str) -> int:
    """Index (in the padded token sequence the text encoder sees) of the first token of `word`.
    Raises ValueError naming the prompt's tokens when the word is absent."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    if not word_ids:
        raise ValueError(f"{word!r} tokenizes to nothing")
    for i in range(len(ids) - len(word_ids) + 1):
        if ids[i:i + len(word_ids)] == word_ids:
            return i
    toks = tokenizer.convert_ids_to_tokens(ids)
    raise ValueError(f"{word!r} is not among the tokens of {prompt!r}: {toks}")


def check_length(tokenizer, prompt: str) -> str | None:
    """A warning text if the prompt is longer than the tokenizer's limit (what gets cut), else None."""
    ids = tokenizer(prompt).input_ids
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return None
    cut = tokenizer.decode(ids[limit - 1:-1])
    return (f"prompt is {len(ids)} tokens, longer than the text encoder's {limit}: "
            f"'{cut}' will be ignored")
