"""The reduce stage: per-prompt selections, per-teacher statistics, the curated SFT set."""
