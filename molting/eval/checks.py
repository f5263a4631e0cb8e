"""Deterministic checks on one generated answer.

Every check reads only the answer text (and, for truncation, the finish reason) and
returns plain data; scoring lives in ``molting.eval.rubric``. Text matching is case- and
accent-insensitive and on whole words (``normalize``, ``has_phrase``), so "Cláudio",
"claudio" and "CLÁUDIO" are the same name and "João" does not match "Joãozinho".

The checks encode the research log's failures: identity collapse ("meu nome é João",
phase 9), leaked template tokens, answers cut by a too-small budget (phase 7),
hallucinated entities ("hector", "ROS2", phase 8) and greedy-decoding loops; and the
``make demo`` run's (issue 12): invented words ("rúzes", "modelõoes"), the system prompt
pasted back in the second person ("você ajuda a pensar, escrever e revisando o código").
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

# Template tokens of the chat formats molting's models use (ChatML, Llama 2/3, Phi-3, Gemma,
# Zephyr/TinyLlama); any ``<|...|>`` token is caught by TEMPLATE_TOKEN_RE as well.
TEMPLATE_TOKENS = ("<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<start_of_turn>", "<end_of_turn>")
TEMPLATE_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>")
# A bare role header on its own line: what a ChatML turn leaves once its special tokens are stripped.
ROLE_HEADER_RE = re.compile(r"^\s*(system|user|assistant)\s*$", re.MULTILINE)

# Who a persona never is, whatever its persona.yaml says: the base models' default identities.
GENERIC_IDENTITIES = ("ChatGPT", "SmolLM", "assistente virtual", "assistente útil", "AI assistant", "helpful assistant")
# Claims of identity, in Portuguese, English and Spanish (normalized text): first person, and the
# second person the persona uses when it recites its system prompt ("você é o João", research log
# phase 8, Q5). A negation right before the verb ("não sou o João") is not a claim.
# Matched on ``_copula_text``, where the Portuguese copula "é" reads "eh" ("você é" is not "você e").
_SECOND_PERSON = r"(?:voce eh|tu es|seu nome eh|teu nome eh|you are|you're|your name is|tu eres|usted es|tu nombre es)"
_CLAIM = (
    r"(?<!nao )(?<!nunca )(?<!no )(?<!not )"
    r"(?:eu sou|sou|me chamo|meu nome eh?|aqui eh?|i am|i'm|my name is|this is|soy|me llamo|mi nombre es"
    rf"|eres|{_SECOND_PERSON[3:-1]})"
)
# What the persona is: "você é uma IA", said by the persona, is the system prompt read back.
AI_NOUNS = ("IA", "inteligência artificial", "AI", "artificial intelligence", "modelo de linguagem", "language model")
# Words allowed between the claim and the name: articles, possessives, a few adjectives.
_FILLER = r"(?:(?:o|a|um|uma|seu|sua|teu|tua|the|an|your|el|la|un|una|su|helpful|util|virtual|generico)\s+){0,3}"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


STOPWORDS = {
    "pt": _words(
        "o a os as um uma de do da dos das em no na nos nas e que é não com por para pra mais "
        "mas como eu você voce meu minha seu sua isso isto ele ela se ao também tambem sou está "
        "esta são muito já ja quando onde porque sobre foi ser tem ter nós nos aqui"
    ),
    "en": _words(
        "the a an of in on and is are to for with that this it i you my your not but as be was "
        "have has what when where who why about from at by we our can do does am"
    ),
    "es": _words(
        "el la los las un una de del en y que es no con por para más pero como yo tú usted mi "
        "su eso esto él ella se al también soy está son muy ya cuando donde porque sobre fue "
        "ser tiene nosotros aquí"
    ),
}
TERMINAL = (".", "!", "?", "…", ")", '"', "”", "»", "`")


def normalize(text: str) -> str:
    """Lower-case, accent-free, whitespace-collapsed ``text`` ("Você É" -> "voce e")."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", stripped).strip()


def has_phrase(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words, ignoring case and accents."""
    needle = normalize(phrase)
    return bool(needle) and re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", normalize(text)) is not None


def leaked_tokens(answer: str) -> list[str]:
    """Template tokens and bare role headers in ``answer``, in order of appearance.

    A leak is an automatic fail: the model (or the backend) is emitting the chat format
    itself, so the answer would corrupt the next turn of any conversation.
    """
    found = [(m.start(), m.group()) for m in TEMPLATE_TOKEN_RE.finditer(answer)]
    found += [(answer.find(t), t) for t in TEMPLATE_TOKENS if t in answer]
    found += [(m.start(), f"role header {m.group(1)!r}") for m in ROLE_HEADER_RE.finditer(answer)]
    return [token for _, token in sorted(found)]


def _copula_text(text: str) -> str:
    """``normalize(text)`` with the Portuguese copula "é" kept apart from "e" (and) as "eh"."""
    return normalize(re.sub(r"(?<!\w)é(?!\w)", "eh", text.casefold()))


def identity_claims(answer: str, forbidden: Iterable[str], self_names: Iterable[str] = ()) -> list[str]:
    """The forbidden identities ``answer`` claims, in any grammatical person.

    "Sou o João", "meu nome é João", "I am ChatGPT" (first person), "você é o João" (the
    second person of a recited system prompt) and, given ``self_names``, "o Cláudio é o
    João" (third person) are claims. "Trabalho com o João", "o João é meu parceiro" and
    "não sou o João" are not: mentioning someone, or denying being them, is not being them.

    Args:
        answer: the generated text.
        forbidden: names the persona must never claim (its ``forbidden_identities``);
            ``GENERIC_IDENTITIES`` are always added.
        self_names: the persona's own names, for third-person claims.

    Returns:
        The claimed names, as given in ``forbidden`` or ``GENERIC_IDENTITIES``, without repeats.
    """
    text = _copula_text(answer)
    selves = "|".join(re.escape(normalize(n)) for n in self_names)
    claim = rf"(?:{_CLAIM}|(?:{selves})\s+(?:eh|is|es))" if selves else _CLAIM
    claims = []
    for name in dict.fromkeys([*forbidden, *GENERIC_IDENTITIES]):
        if re.search(rf"(?<!\w){claim}\s+{_FILLER}{re.escape(normalize(name))}(?!\w)", text):
            claims.append(name)
    return claims


def second_person_self_references(answer: str, names: Iterable[str], system_prompt: str = "") -> list[str]:
    """Statements in which the persona calls itself "você": its system prompt read back as its own answer.

    "Você é o Cláudio", "você é uma IA", "você é curioso", "seu nome é Cláudio" said by
    Cláudio; and, given ``system_prompt``, a sentence opening with "você" and a verb the prompt
    uses for the persona ("Você ajuda a pensar", "Você participa do Molting"): issue 12's
    ``make demo`` answers.
    Questions ("Você é o Cláudio?") are not statements and are skipped.

    Args:
        answer: the generated text.
        names: the persona's names and traits; ``AI_NOUNS`` are added.
        system_prompt: the persona's system prompt, written in the second person.

    Returns:
        The matched phrases (normalized), in order.
    """
    targets = "|".join(re.escape(normalize(n)) for n in [*names, *AI_NOUNS] if n.strip())
    patterns = [rf"(?<!\w){_SECOND_PERSON}\s+{_FILLER}(?:{targets})(?!\w)"]
    prompt = _copula_text(system_prompt)
    verbs = set(re.findall(r"(?<!\w)(?:voce|you|tu|usted) (\w+)", prompt)) - {"eh", "are", "es"}
    if verbs:
        # Only as the sentence's subject: "se você conhece React" is about the user.
        patterns.append(rf"^\W*(?:voce|you|tu|usted) (?:{'|'.join(map(re.escape, sorted(verbs)))})(?!\w)")
    nouns = set(re.findall(r"(?<!\w)(?:seu|sua|your|tu) (\w+)", prompt))
    if nouns:
        # The prompt's possessives describe the persona: "seu parceiro", "seu jeito".
        patterns.append(rf"(?<!\w)(?:seu|sua|your|tu) (?:{'|'.join(map(re.escape, sorted(nouns)))})(?!\w)")
    found = []
    for sentence in re.findall(r"[^.!?\n]+[.!?]?", answer):
        if not sentence.rstrip().endswith("?"):
            text = _copula_text(sentence)
            found += [m.group() for pattern in patterns for m in re.finditer(pattern, text)]
    return found


def matched_groups(answer: str, groups: Iterable[Iterable[str]]) -> list[str | None]:
    """For each group of alternative phrases, the first one in ``answer``, or None."""
    return [next((p for p in group if has_phrase(answer, p)), None) for group in groups]


# A wrong statement preceded by one of these (at most one word between) is denied, not stated.
_NEGATION = r"(?:nao|nunca|jamais|nem|not|never|isn't)"  # not "no": Portuguese "no" is "in the"


def stated_groups(answer: str, groups: Iterable[Iterable[str]]) -> list[str | None]:
    """``matched_groups`` for statements: a phrase denied right before it does not count.

    "O João é meu filho" states "meu filho"; "o João não é meu filho" and "não sou o João"
    deny it (a negation word at most one word before the phrase).
    """
    text = normalize(answer)

    def stated(phrase: str) -> bool:
        needle = re.escape(normalize(phrase))
        for match in re.finditer(rf"(?<!\w){needle}(?!\w)", text):
            before = text[: match.start()].split()[-2:]
            if not any(re.fullmatch(_NEGATION, word) for word in before):
                return True
        return False

    return [next((p for p in group if normalize(p) and stated(p)), None) for group in groups]


def detect_language(answer: str, min_words: int = 4) -> str | None:
    """The ``STOPWORDS`` language with the most stopwords in ``answer``; None if undecidable.

    Undecidable: fewer than ``min_words`` words, no stopword at all, or a tie.
    """
    words = re.findall(r"[\w']+", answer.casefold())
    if len(words) < min_words:
        return None
    counts = {lang: sum(w in stop for w in words) for lang, stop in STOPWORDS.items()}
    ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)
    if ranked[0][1] == 0 or ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


def is_truncated(answer: str, finish_reason: str | None) -> bool:
    """Cut mid-sentence: generation hit ``max_new_tokens`` and the text has no final punctuation.

    An answer that ends cleanly exactly at the limit is not counted; one that the
    model ended itself (``finish_reason == "stop"``) never is.
    """
    return finish_reason == "length" and not answer.rstrip().endswith(TERMINAL)


def repetition_ratio(answer: str, n: int = 4) -> float:
    """Share of word ``n``-grams in ``answer`` that repeat an earlier one, in [0, 1).

    0 for a text with no repeated n-gram; a greedy-decoding loop that says the same
    sentence over and over approaches 1. Texts shorter than ``n`` words give 0.
    """
    words = normalize(answer).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def entity_candidates(answer: str) -> list[str]:
    """Words that look like names: capitalised mid-sentence, or technical-looking anywhere.

    Technical-looking: an inner capital, a digit or a dot inside, or all capitals
    (``OpenCV``, ``ROS2``, ``Node.js``, ``MATLAB``). Sentence-initial capitals alone do
    not count ("Eu", "Olá").
    """
    found = []
    for sentence in re.split(r"(?<=[.!?:;\n])\s+", answer):
        words = re.findall(r"[^\W_][\w.+#-]*[\w+#]|[^\W_]", sentence)
        for position, word in enumerate(words):
            technical = re.search(r"[a-z][A-Z]|\d|\w\.\w", word) is not None or (len(word) > 1 and word.isupper())
            named = position > 0 and word[0].isupper()
            if technical or named:
                found.append(word)
    return list(dict.fromkeys(found))


def unknown_entities(answer: str, known: set[str]) -> list[str]:
    """``entity_candidates`` of ``answer`` whose normalized form is not in ``known``.

    Args:
        answer: the generated text.
        known: normalized (``normalize``) words and names the persona, its dataset and
            its rubric mention; anything else named in an answer was invented.
    """
    return [word for word in entity_candidates(answer) if normalize(word) not in known]


def vocabulary(texts: Iterable[str]) -> set[str]:
    """Every normalized word and dotted name in ``texts``, for ``unknown_entities``."""
    words: set[str] = set()
    for text in texts:
        normalized = normalize(text)
        words.update(re.findall(r"[^\W_][\w.+#-]*[\w+#]|[^\W_]", normalized))
        words.add(normalized)
    return words


# Word tokens, with inner hyphens, apostrophes or dots ("full-stack", "i'm", "next.js"); for fluency
# only those made of letters count as words ("ROS2" and "user_id" are names, not words).
TOKEN_RE = re.compile(r"\w+(?:[-'’.]\w+)*")


@functools.cache
def word_list(language: str) -> frozenset[str]:
    """The words of ``language`` ("pt", "en", "es"), normalized (``normalize``), from pyspellchecker.

    pyspellchecker ships its word-frequency lists inside the wheel (built from
    OpenSubtitles and Wikipedia); nothing is downloaded. Its Portuguese list is European
    Portuguese, so accents are dropped on both sides ("irônico" finds "irónico"). Loading
    takes about 2 s per language; the result is cached for the process.

    Raises:
        ValueError: a language pyspellchecker has no list for.
    """
    from spellchecker import SpellChecker

    return frozenset(normalize(word) for word in SpellChecker(language=language, distance=1).word_frequency)


def words_of(text: str) -> list[str]:
    """The word tokens of ``text`` made of letters only (with inner hyphens or apostrophes)."""
    return [t for t in TOKEN_RE.findall(text) if re.fullmatch(r"[^\W\d_]+(?:[-'’][^\W\d_]+)*", t)]


def invented_words(answer: str, language: str, known: set[str]) -> list[str]:
    """Words of ``answer`` found neither in ``language``'s word list nor in ``known``.

    English words count as known in any language (developers say "deploy" and "stack" in
    Portuguese too). Names (``entity_candidates``) are left to ``unknown_entities``. A
    hyphenated word is known if it is, or if each of its parts is.

    Args:
        answer: the generated text.
        language: ISO 639-1 code of the answer's expected language.
        known: normalized words of the persona, its dataset and its rubric (``vocabulary``).

    Returns:
        The invented words as written, in order, repeats kept.
    """
    lists = [word_list(language)] + ([word_list("en")] if language != "en" else [])
    names = {normalize(e) for e in entity_candidates(answer)}

    def is_known(word: str) -> bool:
        return word in known or word in names or any(word in words for words in lists)

    invented = []
    for word in words_of(answer):
        norm = normalize(word)
        parts = re.split(r"[-'’]", norm)
        if not (is_known(norm) or all(is_known(p) for p in parts if len(p) > 1)):
            invented.append(word)
    return invented


def invented_share(answer: str, language: str, known: set[str]) -> tuple[float, list[str]]:
    """The share of ``answer``'s words that are ``invented_words``, in [0, 1], and those words.

    0.0 for an answer without words.
    """
    words = words_of(answer)
    invented = invented_words(answer, language, known)
    return (len(invented) / len(words) if words else 0.0), invented


def foreign_words(answer: str, language: str, known: set[str]) -> list[str]:
    """Words of ``answer`` that are English and not words of ``language``: code-switching.

    The research log's phase 9 saw Portuguese answers drift into English mid-sentence.
    Words of the persona's vocabulary (``known``: "deploy", "stack") and names are not
    counted. Empty when ``language`` is English.
    """
    if language == "en":
        return []
    own, english = word_list(language), word_list("en")
    names = {normalize(e) for e in entity_candidates(answer)}
    found = []
    for word in words_of(answer):
        norm = normalize(word)
        if norm in english and norm not in own and norm not in known and norm not in names:
            found.append(word)
    return found


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = re.findall(r"\w+", normalize(text))
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def copied_share(answer: str, source: str, exempt: Iterable[str] = (), n: int = 4) -> float:
    """The share of ``answer``'s word ``n``-grams copied from ``source`` and found in no ``exempt`` text.

    With ``source`` the system prompt and ``exempt`` the persona's own dataset answers,
    this measures the prompt pasted back ("você ajuda a pensar, escrever e revisando o
    código"), while the way the persona itself states a fact in its dataset is not
    copying. Matching ignores case, accents and punctuation.

    Returns:
        A share in [0, 1]; 0.0 for an answer shorter than ``n`` words.
    """
    grams = _ngrams(answer, n)
    if not grams:
        return 0.0
    allowed = {g for text in exempt for g in _ngrams(text, n)}
    copied = set(_ngrams(source, n)) - allowed
    return sum(g in copied for g in grams) / len(grams)


# --- issue 25: what a reader sees that the checks above did not --------------------------------


def echoed_groups(question: str, groups: Iterable[Iterable[str]], hits: Iterable[str | None]) -> list[bool]:
    """For each matched fact group, whether its matched phrase is a word of the ``question`` itself.

    "Quais são seus pontos fortes e fracos?" answered "Pontos: ... Fracos: ..." holds the
    phrases "fortes" and "fracos" only because the question does: the answer echoes, it does
    not state a fact. ``hits`` is ``matched_groups(answer, groups)``; a group not matched is
    not echoed.
    """
    return [hit is not None and has_phrase(question, hit) for _, hit in zip(groups, hits, strict=True)]


# Words that open a question asking for content ("Quais são...?", "What is...?"): echoing its words
# answers nothing. A yes/no question or an invitation ("Tudo bem?", "Bora bater um papo?") is
# answered by echoing it ("Tudo bem!", "Bora!").
OPEN_QUESTION_WORDS = _words(
    "quais qual quem que como onde quando quanto quantos quantas porque por pra para "
    "what which who whom whose how where when why "
    "cual cuales quien quienes donde cuando cuanto"
)


def is_open_question(question: str) -> bool:
    """Whether the last question of ``question`` asks for content: it opens on a question word
    ("Quais são seus pontos fortes?", "O que é o Molting?", "Me fala sobre você"), or is no
    question at all (a request). "Tudo bem?" and "Você é o ChatGPT?" are not open."""
    asked = [q for q in re.findall(r"[^.!?\n]*\?", question) if q.strip()]
    if not asked or not question.rstrip().endswith("?"):  # a request, or one after the question
        return True
    words = normalize(asked[-1]).split()
    words = words[1:] if words[:1] in (["e"], ["and"], ["y"]) else words
    return bool(words) and (words[0] in OPEN_QUESTION_WORDS or words[:2] in (["o", "que"], ["do", "que"]))


def counted_facts(question: str, groups: list[list[str]], answer: str) -> list[str | None]:
    """``matched_groups``, less the groups matched only by an open question's own words, unless
    the answer also states a fact that is not in the question (then the echo frames real content).

    A yes/no question ("Tudo bem?") is answered by its own words, so nothing is taken off there.

    Returns:
        Per group, the phrase that counts, or None.
    """
    hits = matched_groups(answer, groups)
    if not is_open_question(question):
        return hits
    echoed = echoed_groups(question, groups, hits)
    if any(hit is not None and not echo for hit, echo in zip(hits, echoed, strict=True)):
        return hits
    return [None if echo else hit for hit, echo in zip(hits, echoed, strict=True)]


def wrong_language(answer: str, expected: str) -> str | None:
    """The language ``answer`` is written in when it is not ``expected`` (None: right, or undecidable)."""
    detected = detect_language(answer)
    return detected if detected not in (None, expected) else None


# A sentence that opens on a bare copula continues the previous sentence's subject: "O Molting é um
# projeto de pesquisa. É uma startup..." says the Molting is a startup.
_ELIDED = re.compile(r"^(?:eh|it is|it's|es)\s")
_ARTICLE = re.compile(r"^(?:o|a|the|el|la)\s+")
_SUBJECT = re.compile(r"^(?:(?:o|a|the|el|la)\s+)?([\w.-]+(?:\s+[\w.-]+)?)\s+(?:eh|is|es)\s")


def with_subjects(answer: str) -> str:
    """``answer`` normalized, each sentence that opens on a bare copula given the previous subject.

    "O Molting é um projeto. É uma startup." reads "o molting eh um projeto. molting eh uma
    startup.", so that a per-question ``wrong`` phrase "Molting é uma startup" finds it. A
    sentence with its own subject ("A Softtor é uma startup.") is left as it is. The copula
    "é" is written "eh" (``_copula_text``), so match phrases through the same function.
    """
    out, subject = [], None
    for sentence in re.findall(r"[^.!?\n]+[.!?\n]*", answer):
        text = _copula_text(sentence)
        if (own := _SUBJECT.match(text)) and not _ELIDED.match(text):
            subject = own.group(1)
        elif subject and _ELIDED.match(text):
            text = re.sub(r"^(?:it is|it's)\s", "is ", text)  # English names its subject "it"
            text = f"{subject} {text}"
        out.append(text)
    return " ".join(out)


def elided_statements(answer: str, phrases: Iterable[str]) -> list[str]:
    """The ``phrases`` (subject, copula, predicate: "Molting é uma startup") that ``answer`` states
    only through a sentence opening on a bare copula (``with_subjects``); a denial before them
    does not count, as in ``stated_groups``. The subject a bare copula takes over has no article
    ("João Figueiredo é o dev. É a IA" reads "joao figueiredo eh a ia"), so a phrase's own
    leading article is not required ("o João Figueiredo é a IA" finds it)."""
    resolved = with_subjects(answer)
    found = []
    for phrase in phrases:
        needle = re.escape(_ARTICLE.sub("", _copula_text(phrase)))
        for match in re.finditer(rf"(?<!\w){needle}(?!\w)", resolved):
            before = resolved[: match.start()].split()[-2:]
            if not any(re.fullmatch(_NEGATION, word) for word in before):
                found.append(phrase)
                break
    return found


def clauses(answer: str) -> list[str]:
    """The clauses of ``answer``, normalized: the text between punctuation marks."""
    return [c.strip() for c in re.split(r"[.,;:!?()\n—–-]+\s", normalize(answer) + " ") if c.strip()]


def repeated_clauses(answer: str, min_words: int = 2) -> list[str]:
    """Clauses of at least ``min_words`` words that repeat an earlier clause of the answer.

    "No código, no código. No CRM, no CRM." repeats "no codigo" and "no crm"; "Pontos: o que é
    uma ideia de um produto... Fracos: o que é uma ideia de um produto" repeats the second
    clause. Known words that say the same thing twice say little.
    """
    seen, repeats = set(), []
    for clause in clauses(answer):
        if len(clause.split()) < min_words:
            continue
        if clause in seen:
            repeats.append(clause)
        seen.add(clause)
    return repeats


def doubled_entities(answer: str, names: Iterable[str]) -> list[str]:
    """Names said twice in one clause, the second time as the first's own attribute.

    "ele é o João Figueiredo que decide o produto do João": a fact about João restated as
    João's role of his own; a reader finds no one in it. A name twice in separate clauses
    ("O João é dev. O João...") is not counted; "João" inside "João Figueiredo" is a mention.

    Returns:
        The names (normalized) said twice or more in some clause, without repeats.
    """
    found = []
    for clause in clauses(answer):
        for name in {normalize(n) for n in names if n.strip()}:
            if len(re.findall(rf"(?<!\w){re.escape(name)}(?!\w)", clause)) >= 2:
                found.append(name)
    return sorted(set(found))


# First-person claims of being an AI and of being a person: one answer cannot make both.
AI_CLAIMS = ("sou uma IA", "sou a IA", "sou uma inteligência artificial", "sou a inteligência artificial",
             "sou um programa", "sou um modelo", "sou uma máquina", "I am an AI", "I'm an AI", "I am the AI",
             "I'm the AI", "I am a program", "I'm a program")
PERSON_CLAIMS = ("sou uma pessoa", "sou uma pessoa de verdade", "sou humano", "sou uma pessoa real",
                 "sou de carne e osso", "sou gente", "I am a person", "I'm a person", "I am human", "I'm human",
                 "I am a real person", "I'm a real person", "I am a human", "I'm a human")


def self_contradiction(answer: str, first: Iterable[str] = AI_CLAIMS, second: Iterable[str] = PERSON_CLAIMS) -> bool:
    """Whether ``answer`` states one of ``first`` and one of ``second`` (denials do not count).

    "Sou uma pessoa de verdade, e eu sou o Cláudio, a IA da Softtor." claims to be a person and
    an AI: the second clause contradicts the first ("a IA" in apposition counts as "sou a IA").
    "Não sou uma pessoa, sou uma IA" does not.
    """
    text = re.sub(r"(?<!\w)(sou|i'm|i am) (?:o |the )?\w+,? (a|an|uma|the) ", r"\1 \2 ", normalize(answer))
    return bool(any(stated_groups(text, [list(first)])) and any(stated_groups(text, [list(second)])))


def factless_share(answer: str, phrases: Iterable[str]) -> tuple[float, list[str]]:
    """The share of ``answer``'s words that lie in clauses holding none of ``phrases`` (the persona's
    facts and names), and those clauses.

    Issue 25: in fresh answers a reader scored low, the facts were there and the clauses around
    them said nothing or something muddled ("Trabalho com ele e ainda construído as decisões de
    um produto"); among the answers the rubric scored 7 or more, the reader's score fell with
    this share (Spearman -0.49 over 26 answers, 2026-12-06). Clauses are ``clauses``' text
    between punctuation marks.

    Returns:
        (share in [0, 1] of the answer's words, the fact-less clauses in order); (0.0, []) for an
        answer with no words.
    """
    parts = clauses(answer)
    total = sum(len(c.split()) for c in parts)
    if not total:
        return 0.0, []
    empty = [c for c in parts if not any(has_phrase(c, p) for p in phrases if p.strip())]
    return sum(len(c.split()) for c in empty) / total, empty
