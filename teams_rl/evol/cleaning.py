"""The instruction inside what an LLM returns for a rewrite, and which cleanings it took to get there.

Learnt from real replies (`tests/fixtures/smollm2_rewrites.jsonl`): SmolLM2-135M-Instruct opens with "The new
prompt should be ...:", "Here's a rewritten version of the given prompt:", "#Rewritten Prompt#:" (sometimes
twice, or followed by an echoed "#Given Prompt#:" section), copies lines of the operator's own prompt ("Make
it more complex this way:"), wraps the text in quotes and trails meta sentences ("The rewritten prompt must
...") after it; WizardLM-style models write "#Rewritten Prompt#:" / "Rewritten Prompt:" headers.

Each cleaning has a kind (`KINDS`), counted by the generate and policy stages:
  marker         the text under an output header ("#Rewritten Prompt#:", "Rewritten prompt:", "New prompt:")
  preamble       a chatty lead-in ("Sure! Here is the rewritten prompt:", "Here's a rewritten version ...:")
  meta_lead      a leading phrase, sentence or line about the prompt itself ("The new prompt must be about X:",
                 "The given prompt must not exceed 2048 words.")
  template_echo  lines copied from the operator's template (only when the template is given)
  wrapper        surrounding quotes (also one left open by a cut-off reply), code fences, markdown bold
  trailer        what follows the instruction: "Explanation: ...", "This rewritten prompt ...", a line about the
                 prompt, an echoed "#Given Prompt#" section
A reply with nothing usable left is rejected, with a reason (`REJECTIONS`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from teams_rl.evol.elimination import TEMPLATE_WORDS

KINDS = ("marker", "preamble", "meta_lead", "template_echo", "wrapper", "trailer")
REJECTIONS = ("empty", "given_echo", "meta_only", "too_short")


@dataclass(frozen=True)
class Cleaned:
    """`text`: the instruction (None when rejected, `rejected` says why); `actions`: the kinds of cleaning
    applied, each once, in the order first applied."""

    text: str | None
    actions: tuple[str, ...] = ()
    rejected: str | None = None


_OUT = r"(?:rewritten|created|new|revised|modified|final|evolved|(?:more\s+)?complex|harder)"
_TARGET = r"(?:version\s+of\s+the\s+)?(?:prompt|instruction)"
# An output header: "#Rewritten Prompt#:", "# Rewritten Prompt#", "Rewritten Prompt#:", "**New prompt:**" ...
_OUTPUT_MARKER = re.compile(
    rf"#\s*(?:the\s+)?{_OUT}\s+{_TARGET}\s*#\s*:?[#*]*"
    rf"|[#*]*\s*(?:the\s+)?{_OUT}\s+{_TARGET}\s*[#*]*\s*:[#*]*"
    rf"|^[ \t]*#+[ \t]*{_OUT}[ \t]+{_TARGET}[ \t]*#*[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
# The template's input header echoed back ("#Given Prompt#:", "# Original Prompt#", "Given prompt:").
_GIVEN_MARKER = re.compile(
    r"#\s*(?:given|original)\s+prompt\s*#\s*:?[#*]*(?=\s*(?:\n|$))|#\s*(?:given|original)\s+prompt\s*#\s*:"
    r"|^[ \t]*[*]*\s*(?:given|original)\s+prompt\s*[*]*\s*:",
    re.IGNORECASE | re.MULTILINE,
)
_PREAMBLE = re.compile(
    r"^(?:(?:sure|certainly|of course|okay|ok|absolutely|great|alright)\b[^\n:]*?"
    r"(?:here|prompt|version|instruction|rewrite|question)[^\n:]*:"
    r"|(?:sure|certainly|of course|okay|absolutely|alright)\b\s*[,!.]\s*"
    r"(?:(?:i'?d|i would|i'?ll|i will|i can|i am|i'm|happy|glad|here you go|no problem)[^.!?\n]*[.!?]\s*)?"
    r"|here(?:'s| is)\b[^\n:]*?(?:prompt|version|instruction|rewrite|question)[^\n:]*:"
    r"|as an? (?:prompt (?:re)?writer|prompt creator|ai(?: language model)?)\b(?:[^\n:]*:|[^\n,]*,))\s*",
    re.IGNORECASE,
)
# The subject of a sentence about the prompt rather than of the prompt: "The new prompt", "The given prompt",
# "This rewritten instruction" (a bare "instruction" is too common in real instructions to count).
_META_ADJ = r"(?:new|given|rewritten|created|revised|modified|evolved|original|resulting|updated|final)"
_META_SUBJECT = rf"(?:the|this|my|our)\s+(?:{_META_ADJ}\s+(?:prompt|instruction)|prompt)"
_META_VERB = r"(?:should|must|is|will|can|could|may|has|needs?|asks?|requires?|would|focuses|contains|includes)"
# After the instruction only an explicit subject counts ("The prompt should mention a dragon." can be a constraint).
_META_STRICT = rf"(?:the|this)\s+{_META_ADJ}\s+(?:prompt|instruction)\s+{_META_VERB}\b"
_META_COLON = re.compile(rf"^{_META_SUBJECT}(?:\s*|\s+{_META_VERB}\b[^\n:]{{0,160}}):[ \t]*(?=\S)", re.IGNORECASE)
_META_SENTENCE = re.compile(rf"^{_META_SUBJECT}\s+{_META_VERB}\b[^\n]*?(?:[.!?]+(?=\s|$)|(?=\n)|$)\s*",
                            re.IGNORECASE)
_TRAILER = re.compile(
    r"\n\s*(?:\**\s*)?(?:explanation|note|notes|rationale|changes made)\s*\**\s*:.*$|"
    r"(?:\n|(?<=[.!?])[ \t]+)\s*(?:this|in this|the above) (?:rewritten|new|created|revised) (?:prompt|instruction)\b.*$|"
    rf"(?<=[.!?])[ \t]+{_META_STRICT}.*$",
    re.IGNORECASE | re.DOTALL,
)
_HASH_HEADER = re.compile(r"#\s*(?:[a-z]+\s+)?prompt\s*#", re.IGNORECASE)  # "#Given Prompt#", "#Created Prompt#"
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "`": "`"}

# What a cleaned instruction must not start with (tests check the fixture against these).
META_START = (_OUTPUT_MARKER, _PREAMBLE, _META_COLON, _META_SENTENCE)


class _Trace:
    def __init__(self):
        self.actions: list[str] = []

    def did(self, kind: str) -> None:
        if kind not in self.actions:
            self.actions.append(kind)


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _strip_wrappers(text: str, trace: _Trace) -> str:
    changed = True
    while changed and text:
        changed = False
        stripped = text.strip()
        if len(stripped) >= 4 and stripped.startswith("**") and stripped.endswith("**"):
            stripped = stripped[2:-2].strip()
        if stripped.startswith("```") and stripped.endswith("```") and len(stripped) >= 6:
            stripped = stripped[3:-3].strip()
            first, _, rest = stripped.partition("\n")
            if rest and re.fullmatch(r"[a-zA-Z]+", first.strip() or "x"):  # a language tag line
                stripped = rest.strip()
        if len(stripped) >= 2 and stripped[0] in _QUOTES:
            close = _QUOTES[stripped[0]]
            inner = stripped[1:-1] if stripped[-1] == close else None
            if inner is not None and stripped[0] not in inner and (close == stripped[0] or close not in inner):
                stripped = inner.strip()  # one quoted block, not "a" and "b"
            elif close not in stripped[1:] and stripped[0] in "\"\u201c\u00ab":
                stripped = stripped[1:].strip()  # opened but never closed: the reply was cut off
        if stripped != text:
            if stripped != text.strip():
                trace.did("wrapper")
            text, changed = stripped, True
    return text


def _is_meta_line(line: str) -> bool:
    """A line that talks about the prompt (its template's words, a "#... Prompt#" header, "The new prompt must")."""
    low = " ".join(line.lower().split())
    return (any(w in low for w in TEMPLATE_WORDS) or _HASH_HEADER.search(line) is not None
            or re.match(_META_STRICT, line.strip(), re.IGNORECASE) is not None)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[#*\"'`:]", " ", text.lower()).split()).strip(" .!?")


_QUOTE_CHARS = "".join(sorted(set(_QUOTES) | set(_QUOTES.values())))


def _loose(frame: str) -> str:
    """A pattern for a piece of template as models copy it: any spacing between its words, and each quote
    optional and of any kind (a cut-off reply loses the closing one, a chatty one drops both)."""
    parts = []
    for token in re.findall(r"\w+|\S", frame):
        parts.append(f"[{re.escape(_QUOTE_CHARS)}]?" if token in _QUOTE_CHARS else re.escape(token))
    return r"\s*".join(parts)


@functools.lru_cache(maxsize=64)  # one entry per operator template: computed once, not once per rewrite
def _template_parts(template: str) -> tuple[tuple[str, str], re.Pattern | None]:
    """(the normalised template text before and after its slot, a pattern for the slot's own line when the slot
    shares its line with template words, as in the short templates). The line's words before the slot must be
    there; what follows the slot may be missing (a reply cut off at max_tokens)."""
    before, _, after = template.partition("{instruction}")
    head, tail = before.rsplit("\n", 1)[-1], after.split("\n", 1)[0]
    slot_line = None
    if _words(head) + _words(tail) >= 2:
        slot_line = re.compile(rf"\s*{_loose(head)}\s*(.+?)\s*(?:{_loose(tail)})?\s*$", re.IGNORECASE)
    return (_norm(before), _norm(after)), slot_line


def _repeats(text: str, given: str) -> bool:
    """`text` holds nothing `given` does not: the same words, or its first words only (an echo cut off)."""
    words, given_words = re.findall(r"\w+", text.lower()), re.findall(r"\w+", given.lower())
    return bool(words) and words == given_words[:len(words)]


def _drop_template_echo(text: str, template: str | None, trace: _Trace) -> str:
    """Drop lines (>= 4 words) that are a piece of the operator's own prompt, on either side of its instruction
    slot; a line that repeats the slot's own line ('Here is a task: "..."') keeps only what is in the slot."""
    if not template:
        return text
    frames, slot_line = _template_parts(template)
    kept = []
    for line in text.split("\n"):
        match = slot_line.match(line) if slot_line else None
        if match and _words(match.group(1)):
            kept.append(match.group(1))
            trace.did("template_echo")
        elif _words(line) >= 4 and _norm(line) and any(_norm(line) in frame for frame in frames):
            trace.did("template_echo")
        else:
            kept.append(line)
    return "\n".join(kept)


def _under_marker(text: str, trace: _Trace) -> str:
    """The first non-empty text under an output header, up to the next header (output or given)."""
    outs = list(_OUTPUT_MARKER.finditer(text))
    if not outs:
        return text
    stops = sorted({m.start() for m in outs} | {m.start() for m in _GIVEN_MARKER.finditer(text)})
    for m in outs:
        end = next((s for s in stops if s >= m.end()), len(text))
        body = text[m.end():end].strip()
        if _words(body):
            trace.did("marker")
            if end < len(text):
                trace.did("trailer")
            return body
    before = text[:outs[0].start()]
    if _words(before) and before.rstrip(" \t").endswith("\n"):  # an empty header after the text: a trailer
        trace.did("trailer")
        return before.strip()
    trace.did("marker")
    return ""


def _drop_lead(text: str, trace: _Trace) -> str:
    """One leading preamble, meta phrase or meta line/sentence, if any."""
    for pattern, kind in ((_PREAMBLE, "preamble"), (_META_COLON, "meta_lead")):
        new = pattern.sub("", text, count=1).strip()
        if new != text:
            trace.did(kind)
            return new
    first, sep, rest = text.partition("\n")
    if sep and _is_meta_line(first) and not _META_SENTENCE.match(first) and not _GIVEN_MARKER.match(first):
        trace.did("meta_lead")
        return rest.strip()
    new = _META_SENTENCE.sub("", text, count=1).strip()
    if new != text:
        trace.did("meta_lead")
    return new


def _cut_trailer(text: str, trace: _Trace) -> str:
    new = _TRAILER.sub("", text).strip()
    lines = new.split("\n")
    for i in range(1, len(lines)):  # the first line about the prompt after the instruction ends it
        if _is_meta_line(lines[i]):
            kept = lines[:i]
            while kept and (not kept[-1].strip() or kept[-1].rstrip().endswith(":")):
                kept.pop()  # a header ("A non-text element:") that introduced the cut text goes too
            if kept:
                new = "\n".join(kept).strip()
            break
    if new != text:
        trace.did("trailer")
    return new


def clean_rewrite_counted(text: str | None, min_words: int = 3, template: str | None = None,
                          given: str | None = None) -> Cleaned:
    """The instruction inside an LLM's rewrite output and the kinds of cleaning applied (see the module doc).

    `template`: the operator's prompt template, so that lines the model copied from it are dropped. Output with
    fewer than `min_words` words, only meta talk, or only the echoed input section is rejected; with `given`
    (the instruction that was rewritten), so is an output that only repeats it or its first words."""
    trace = _Trace()
    if not text or not text.strip():
        return Cleaned(None, (), "empty")
    text = _drop_template_echo(text.replace("\r\n", "\n").strip(), template, trace).strip()
    text = _under_marker(text, trace)
    for _ in range(6):  # leads can stack: "Sure! Here is the new prompt:\n\n\"The new prompt is: ...\""
        new = _strip_wrappers(_drop_lead(_strip_wrappers(text, trace), trace), trace)
        new = _under_marker(new, trace) if _OUTPUT_MARKER.match(new) else new
        if new == text:
            break
        text = new
    text = _strip_wrappers(_cut_trailer(text, trace), trace)
    actions = tuple(trace.actions)
    if _GIVEN_MARKER.match(text) or (given is not None and _repeats(text, given)):
        return Cleaned(None, actions, "given_echo")  # the model echoed the input (section), or a cut-off part of it
    if not _words(text):
        return Cleaned(None, actions, "meta_only" if {"meta_lead", "template_echo"} & set(actions) else "empty")
    if _words(text) < max(1, min_words):
        return Cleaned(None, actions, "too_short")
    return Cleaned(text, actions)


def clean_rewrite(text: str | None, min_words: int = 3, template: str | None = None,
                  given: str | None = None) -> str | None:
    """The instruction inside an LLM's rewrite output, or None when nothing usable is left
    (`clean_rewrite_counted` also says which cleanings were applied)."""
    return clean_rewrite_counted(text, min_words, template, given).text
