"""Names shared across the house: the files of a persona directory and the answer languages.

A leaf module (it imports nothing), so that the file formats (``molting.persona``,
``molting.eval.rubric``, ``molting.eval.probes``) agree on them without importing one another.
"""

PERSONA_FILE = "persona.yaml"
DATASET_FILE = "dataset.jsonl"
PREFERENCES_FILE = "preferences.jsonl"
RUBRIC_FILE = "rubric.yaml"
PROBES_FILE = "probes.yaml"
# The held-out test probes (issue 25): reported, never tuned on (molting.eval.probes).
PROBES_TEST_FILE = "probes-test.yaml"
LABELLED_FILE = "labelled.jsonl"
# Held-out multi-turn conversations (issue 23): drift per turn (molting.eval.conversations).
CONVERSATIONS_FILE = "conversations.yaml"
# Every file a persona directory may hold, in the order the registry hashes them.
PERSONA_FILES = (
    PERSONA_FILE, DATASET_FILE, PREFERENCES_FILE, RUBRIC_FILE, PROBES_FILE, PROBES_TEST_FILE, LABELLED_FILE,
    CONVERSATIONS_FILE,
)
# ISO 639-1 codes of the languages a persona may answer in.
LANGUAGES = ("pt", "en", "es")
