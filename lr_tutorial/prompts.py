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
    """y^p -> y^-p: drop the identifier word (in any case: 'SKS', 'Sks'), keep everything else."""
    out = re.sub(rf"(?<![\w<]){re.escape(identifier)}(?![\w>])\s*", "", prompt,
                 flags=re.IGNORECASE)
    return " ".join(out.split())


def lowercase_tokenizer(tokenizer):
    """Make a fast tokenizer without a normalizer case-insensitive (as CLIP's is): 'Star',
    'SKS' and 'star' give the same tokens. Returns the tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.normalizer is None:
        from tokenizers.normalizers import Lowercase
        backend.normalizer = Lowercase()
    return tokenizer


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """The words of `prompt` that the tokenizer turns (partly) into its unknown token."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    return [w for w in prompt.split()
            if unk in tokenizer(w, add_special_tokens=False).input_ids]


def check_vocabulary(tokenizer, prompt: str, allow_unknown: bool = False) -> None:
    """ValueError (or, with allow_unknown, a UserWarning) naming the words of `prompt` the
    tokenizer does not know, and the vocabulary when it is small enough to list (the toy's)."""
    bad = unknown_words(tokenizer, prompt)
    if not bad:
        return
    vocab = sorted(t for t in tokenizer.get_vocab() if not t.startswith("<"))
    known = (f"known words: {' '.join(vocab)}" if len(vocab) <= 200
             else "rephrase with common words")
    msg = (f"prompt {prompt!r}: {', '.join(repr(w) for w in bad)} not in the text encoder's "
           f"vocabulary (the model would read an unknown token); {known}")
    if allow_unknown:
        warnings.warn(msg, stacklevel=3)
    else:
        raise ValueError(msg + " (allow_unknown_words=True / --allow-unknown-words only "
                         "warns)")


def read_prompt_file(path) -> list[str]:
    """Prompts from a text file, one per line ('#' starts a comment line): UTF-8, with or
    without a byte-order mark. A file in another encoding (UTF-16, Latin-1, ...) is refused
    with a ValueError naming it and the fix."""
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; check the path")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"prompt file {path} is UTF-16 encoded; save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 (byte {e.start}: "
                         f"{data[e.start:e.start + 1]!r}; Latin-1 or Windows-1252?); save it "
                         "as UTF-8") from e
    if "\x00" in text:
        raise ValueError(f"prompt file {path} holds NUL bytes (a binary file or UTF-32?); "
                         "give a UTF-8 text file, one prompt per line")
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line; '#' starts a comment)")
    return prompts


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
    _warn_vanilla_only(bundle)
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {p!r} is empty or not a string; write e.g. "
                             f"'a {ident or 'sks'} {noun or 'dog'} on the beach'")
        check_vocabulary(bundle.tokenizer, p, getattr(bundle, "allow_unknown_words", False))
        if ident:
            check_personal_prompt(p, ident, noun)
        note = check_length(bundle.tokenizer, p)
        if note:
            warnings.warn(f"{p!r}: {note}", stacklevel=3)
    return [token_index(bundle.tokenizer, p, noun) for p in prompts] if need_class else []


def _warn_vanilla_only(bundle) -> None:
    """One UserWarning per bundle when a Stable Diffusion bundle has no personalized model:
    its "personalized" steps then run the vanilla model."""
    if getattr(bundle, "backend", None) != "sd" or getattr(bundle, "has_personal", True) \
            or getattr(bundle, "_warned_vanilla_only", False):
        return
    try:
        bundle._warned_vanilla_only = True
    except AttributeError:  # pragma: no cover - a frozen bundle
        pass
    warnings.warn("this Stable Diffusion bundle has no personalized model, so the personalized "
                  "steps run the vanilla model and nothing of your subject is learned; load one "
                  "with load_models('sd', personalized='DIR', class_noun=...) (--personalized "
                  "on the command line)", stacklevel=4)
