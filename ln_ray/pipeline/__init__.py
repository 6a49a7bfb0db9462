"""The Ray Data job: wire read, prepare, score and reduce together; stage and publish outputs."""
