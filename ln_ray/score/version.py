"""The version of what a score means, kept in one place.

The score cache's key holds it (``io/cache.cache_key``), so scores computed before a change to
their numbers are never mixed with scores computed after it. Bump it with any change that moves
a score: the scorer, the segmenter, the student's view, the tokenization of a trace.
``tests/equivalence/test_golden.py`` fails when the golden numbers move while it stays the same.
"""

# 2: control tokens inside a trace's text are tokenized as text; 3: lalp_drop1 scored and cached;
# 4: ifd and ifd_ppl scored and cached
SCORING_VERSION = 4
