"""The phrasing banks: question and answer templates for the offline conversations, and the request
that asks a model to write them, in each language `affiner synth` speaks.

Data, not logic: edit a bank to change what the conversations say. The shipped glossary files take
fixed slices of the English banks (`synth/shipped.py`), so adding phrasings never changes them.
"""

from __future__ import annotations

LANGUAGES = {"en": "English", "fr": "French"}

# Training questions and held-out questions never overlap, so a held-out score measures whether the
# model learned the definition, not whether it memorised a phrasing.
TRAIN_QUESTIONS = {
    "en": (
        "What does {acronym} stand for?",
        "What is {acronym}?",
        "Define {acronym}.",
        "Expand the acronym {acronym}.",
        "What is the full name of {acronym}?",
        "Can you tell me what {acronym} means?",
        "{acronym}: what does it mean?",
        "I saw {acronym} in a report. What is it?",
        "What does the abbreviation {acronym} mean?",
        "What is {acronym} short for?",
        "Spell out {acronym} for me, please.",
        "Quick question: what's {acronym}?",
        "My colleague keeps saying {acronym}. What does it refer to?",
        "What is the meaning of {acronym}?",
        "Give me the expansion of {acronym}.",
        "Do you know what {acronym} stands for?",
        "What do the letters {acronym} stand for?",
        "In our glossary, what is {acronym}?",
        "Please explain the acronym {acronym}.",
        "What's the long form of {acronym}?",
        "I keep running into {acronym} in documents. What does it mean?",
        "Could you define {acronym} for me?",
    ),
    "fr": (
        "Que signifie {acronym} ?",
        "Qu'est-ce que {acronym} ?",
        "Que veut dire {acronym} ?",
        "Définis {acronym}.",
        "Quelle est la signification de {acronym} ?",
        "Que désigne le sigle {acronym} ?",
        "Développe l'acronyme {acronym}.",
        "Quel est le nom complet de {acronym} ?",
        "Peux-tu me dire ce que signifie {acronym} ?",
        "{acronym} : qu'est-ce que ça veut dire ?",
        "J'ai vu {acronym} dans un rapport. De quoi s'agit-il ?",
        "À quoi correspond {acronym} ?",
        "Que représente l'abréviation {acronym} ?",
        "Pouvez-vous m'expliquer ce qu'est {acronym} ?",
        "Quelle est la forme longue de {acronym} ?",
        "Que veulent dire les lettres {acronym} ?",
        "Petite question : c'est quoi, {acronym} ?",
        "Un collègue parle souvent de {acronym}. Qu'est-ce que c'est ?",
        "Donne-moi la définition de {acronym}.",
        "Sais-tu ce que veut dire {acronym} ?",
        "Dans notre glossaire, que signifie {acronym} ?",
        "Je croise souvent {acronym} dans des documents. Que signifie ce sigle ?",
    ),
}
HELD_OUT_QUESTIONS = {
    "en": (
        "Could you explain what the acronym {acronym} refers to?",
        "What's the meaning behind the letters {acronym}?",
        "I'm new here: what is meant by {acronym}?",
        "Remind me, what does {acronym} expand to?",
        "What is {acronym} an abbreviation of?",
        "Someone mentioned {acronym} in a meeting. What is that?",
    ),
    "fr": (
        "Pourriez-vous préciser à quoi fait référence l'acronyme {acronym} ?",
        "Que cache le sigle {acronym} ?",
        "Je suis nouveau ici : que veut dire {acronym} ?",
        "Rappelle-moi ce que désigne {acronym}.",
        "De quoi {acronym} est-il l'abréviation ?",
        "Quelqu'un a parlé de {acronym} en réunion. Qu'est-ce que c'est ?",
    ),
}
# Every answer holds the definition verbatim. French forms avoid "de {definition}", which would need
# an elision ("d'Organisation") that a template cannot know.
ANSWERS = {
    "en": (
        "{acronym} stands for {definition}.",
        "{acronym} means {definition}.",
        "The acronym {acronym} expands to {definition}.",
        "It stands for {definition}.",
        "{acronym} is short for {definition}.",
        "{definition} ({acronym}).",
        "{acronym} is the abbreviation of {definition}.",
        "It means {definition}.",
    ),
    "fr": (
        "{acronym} signifie {definition}.",
        "{acronym} veut dire {definition}.",
        "Le sigle {acronym} désigne {definition}.",
        "Cela signifie {definition}.",
        "{acronym}, c'est {definition}.",
        "{definition} ({acronym}).",
        "L'acronyme {acronym} se développe ainsi : {definition}.",
        "La forme longue de {acronym} est {definition}.",
    ),
}
# Longer answers, used only when the glossary gives a description besides the definition.
DESCRIBED_ANSWERS = {
    "en": (
        "{acronym} stands for {definition}. {description}",
        "{definition} ({acronym}). {description}",
    ),
    "fr": (
        "{acronym} signifie {definition}. {description}",
        "{definition} ({acronym}). {description}",
    ),
}


# ---------------------------------------------------------------------------------------- requests to a model

# The endpoint's request for {count} conversations; "(request {attempt})" makes every retry a new cache key.
PROMPTS = {
    "en": (
        "Write {count} short, varied conversations in English in which a user asks what the acronym below means "
        "and an assistant answers.\n\n"
        "Acronym: {acronym}\n"
        "Meaning: {definition}\n"
        "{context}"
        "Number of conversations: {count}\n\n"
        "Rules:\n"
        "- Every assistant answer contains the meaning exactly as written above, word for word.\n"
        "- The user's questions never contain the meaning: the user does not know it.\n"
        "- Vary the questions (direct, casual, formal, with a little context) and the answers (some restate "
        "the acronym). Keep them short.\n"
        "- Each conversation is a list of messages {{\"role\": \"user\" or \"assistant\", \"content\": \"...\"}} "
        "that starts with the user and ends with the assistant.\n"
        "{avoid}"
        "Reply with raw JSON only, a list of {count} conversations, without code fences or comments:\n"
        "[[{{\"role\": \"user\", \"content\": \"...\"}}, {{\"role\": \"assistant\", \"content\": \"...\"}}]]\n\n"
        "(request {attempt})"
    ),
    "fr": (
        "Écris {count} conversations courtes et variées, en français, dans lesquelles un utilisateur demande ce "
        "que signifie l'acronyme ci-dessous et un assistant répond.\n\n"
        "Acronyme : {acronym}\n"
        "Signification : {definition}\n"
        "{context}"
        "Nombre de conversations : {count}\n\n"
        "Règles :\n"
        "- Chaque réponse de l'assistant contient la signification exactement telle qu'écrite ci-dessus, mot "
        "pour mot.\n"
        "- Les questions de l'utilisateur ne contiennent jamais la signification : il ne la connaît pas.\n"
        "- Varie les questions (directes, familières, formelles, avec un peu de contexte) et les réponses "
        "(certaines reprennent l'acronyme). Reste bref.\n"
        "- Chaque conversation est une liste de messages {{\"role\": \"user\" ou \"assistant\", \"content\": "
        "\"...\"}} qui commence par l'utilisateur et finit par l'assistant.\n"
        "{avoid}"
        "Réponds uniquement en JSON brut, une liste de {count} conversations, sans bloc de code ni commentaire :\n"
        "[[{{\"role\": \"user\", \"content\": \"...\"}}, {{\"role\": \"assistant\", \"content\": \"...\"}}]]\n\n"
        "(demande {attempt})"
    ),
}
# A prompt's {context} and {avoid}: the description, when there is one, and the questions already used, on a retry.
CONTEXT = {"en": "Context (for you only, do not copy it): {}\n", "fr": "Contexte (pour toi seulement, ne le "
           "recopie pas) : {}\n"}
AVOID = {"en": "- Do not reuse these questions:\n{}\n", "fr": "- Ne reprends pas ces questions :\n{}\n"}
