"""Identifier handling: y^p -> y^-p, and where the subject's tokens sit in a prompt.

y^p  = "a sks dog on the beach"  (personalized prompt, with the identifier)
y^-p = "a dog on the beach"      (the same prompt without it, for the vanilla model)
"""
from __future__ import annotations

import re
import warnings


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
    Raises ValueError naming the prompt's tokens when the word is absent, or saying that the
    prompt is too long when the word comes after the tokenizer's limit."""
    if not word:
        raise ValueError("no word given to look up (class noun missing?): pass class_noun=... to "
                         "load_models, e.g. load_models('sd', ..., class_noun='dog')")
    limit = tokenizer.model_max_length
    ids = tokenizer(prompt, verbose=False).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    if not word_ids:
        raise ValueError(f"{word!r} tokenizes to nothing; give a word of the tokenizer's vocabulary")
    for i in range(len(ids) - len(word_ids) + 1):
        if ids[i:i + len(word_ids)] == word_ids:
            if i + len(word_ids) > limit - 1:  # the last position holds the end token
                raise ValueError(
                    f"{word!r} is token {i} of {prompt!r}, past the text encoder's limit of "
                    f"{limit} tokens, so the model never sees it; shorten the prompt or move "
                    f"{word!r} to the front")
            return i
    toks = tokenizer.convert_ids_to_tokens(ids[:limit])
    raise ValueError(f"{word!r} is not among the tokens of {prompt!r}: {toks}; write the word "
                     "as it is, separated by spaces")


def check_identifier(tokenizer, identifier: str, single_token: bool = False) -> None:
    """Raise ValueError if the tokenizer cannot represent the identifier (it maps to the
    unknown token), or, with `single_token` (textual inversion), if it is not one token."""
    ids = tokenizer(identifier, add_special_tokens=False).input_ids
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and unk in ids):
        raise ValueError(
            f"the identifier {identifier!r} is not in the tokenizer's vocabulary (it becomes "
            f"{tokenizer.unk_token!r}), so the text encoder cannot tell it apart; use the "
            "identifier the personalized model was trained with (bundle.identifier), or load "
            "the textual-inversion embedding that adds it (load_models('sd', personalized=...))")
    if single_token and len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"the identifier {identifier!r} is not one token of the tokenizer but {pieces}; a "
            "textual-inversion token must be added to the tokenizer: load its embedding with "
            "load_models('sd', personalized='.../learned_embeds.safetensors')")


def check_length(tokenizer, prompt: str) -> str | None:
    """A warning text if the prompt is longer than the tokenizer's limit (what gets cut), else None."""
    ids = tokenizer(prompt, verbose=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return None
    cut = tokenizer.decode(ids[limit - 1:-1])
    return (f"prompt is {len(ids)} tokens, longer than the text encoder's {limit}: "
            f"'{cut}' will be ignored; shorten the prompt to keep it")


def check_prompts(bundle, prompts: list[str], need_class: bool = True) -> list[int]:
    """Every check a personalized prompt needs before a run, in the order a user would fix
    them: identifier known to the tokenizer, identifier and class noun in each prompt, length
    (a warning saying what is cut). Returns the class noun's token index in each prompt (empty
    when need_class is False)."""
    ident, noun = bundle.identifier, bundle.class_noun
    if need_class and not noun:
        raise ValueError("the model bundle has no class noun, which Layout-and-Retouch needs for "
                         "the subject's cross-attention mask; pass it when loading, e.g. "
                         "load_models('sd', ..., class_noun='dog'), or set bundle.class_noun")
    if ident:
        check_identifier(bundle.tokenizer, ident,
                         single_token=getattr(bundle, "personalization", "") == "textual_inversion")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {p!r} is empty or not a string; write e.g. "
                             f"'a {ident or 'sks'} {noun or 'dog'} on the beach'")
        if ident:
            check_personal_prompt(p, ident, noun)
        note = check_length(bundle.tokenizer, p)
        if note:
            warnings.warn(f"{p!r}: {note}", stacklevel=3)
    return [token_index(bundle.tokenizer, p, noun) for p in prompts] if need_class else []
