"""ln-ray: pick the reasoning traces a student LLM finds most natural, at corpus scale.

Data flows through the subpackages in order: ``io`` reads shards; ``prepare`` validates, segments,
renders and tokenizes rows; ``score`` runs the student (windowed step log-probs, global log-probs
and ranks); ``aggregate`` selects per prompt and ranks teachers; ``pipeline`` wires them into a
Ray Data job.
"""

__version__ = "0.1.0"
