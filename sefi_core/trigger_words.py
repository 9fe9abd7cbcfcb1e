"""Which words can be an identity's trigger: none that prompts already use for something else.

Every whole-word occurrence of the trigger in a prompt becomes the identity (sefi_core.tokens), and the training
prompt is compared with its reference prompt, in which the trigger's place holds the reference word ("a photo of
the face of person"). So a trigger must be a word that an ordinary prompt never contains on its own:

- not the initializer or the reference word: the training prompt would equal its reference prompt at the trigger's
  position, and the face-wise attention loss compares the trigger's attention with that same word's (it measured
  1.5e-7: the loss is off without a word);
- not a closed-class English word (articles, prepositions, pronouns, conjunctions, auxiliaries): each is a single
  whole-word token of CLIP's tokenizer, most of them among its 1,500 first merges (the BPE vocabulary's ids follow
  the order in which merges were learnt, i.e. frequency: "a" 320, "the" 518, "of" 539), and nearly every prompt,
  the training templates included, holds several of them;
- not a word that names the picture or the person in a portrait prompt ("a photo of sks person", "a close-up
  portrait of …"): the training templates, the sample prompts and every prompt that uses the identity hold them.

Both lists are lowercase: CLIP's tokenizer lowercases the text, so "The" is "the" to the model. The lists are
deliberately short — they hold the words that demonstrably collide, not every common English word; a rare made-up
word ("sks", "ohwx") stays the advice.
"""
from __future__ import annotations

from collections.abc import Sequence

FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no all both
of in on at by for with without from to into onto over under above below behind near between among through
across along around against about after before during beside beneath up down out off
and or but nor so yet if than as while because
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
is are was were be been being am do does did have has had can could will would shall should may might must
not very just also too only there here what which who whom whose where when how why
""".split())
"""Closed-class English words: a fixed grammatical set, not a judgement about content."""

PORTRAIT_WORDS = frozenset("""
photo photograph picture image portrait selfie headshot close-up closeup shot
face head person people man woman boy girl child
""".split())
"""What a prompt about a person's picture says anyway: what the picture is and who is in it."""


def check_trigger_word(trigger: str, initializer: str, reference_word: str, input_name: str = "trigger") -> None:
    """Refuse a trigger that prompts already use: the initializer, the reference word, a function word or a
    portrait word (compared lowercase, as CLIP reads them)."""
    word = trigger.strip().lower()
    if word == initializer.strip().lower():
        raise ValueError(f"{input_name} '{trigger}' is the same word as the initializer: the training prompt would "
                         f"be its own reference prompt and the face-wise attention loss would compare the word with "
                         f"itself (no loss at all); pick a rare made-up word such as 'sks' for {input_name}")
    if word == reference_word.strip().lower():
        raise ValueError(f"{input_name} '{trigger}' is the reference word of the attention loss ('a photo of the "
                         f"face of {reference_word}'): the loss would compare the word with itself (no loss at "
                         f"all); pick a rare made-up word such as 'sks' for {input_name}")
    for words, kind in ((FUNCTION_WORDS, "a function word"), (PORTRAIT_WORDS, "a word every portrait prompt uses")):
        if word in words:
            raise ValueError(f"{input_name} '{trigger}' is {kind} (CLIP reads it as '{word}'): every '{word}' in "
                             f"a prompt, the training prompts included, would become the identity; pick a rare "
                             f"made-up word such as 'sks' for {input_name}")


def common_prompt_words() -> Sequence[str]:
    """Every word refused as a trigger besides the initializer and the reference word, sorted."""
    return sorted(FUNCTION_WORDS | PORTRAIT_WORDS)
