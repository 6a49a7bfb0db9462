"""The Ray Data job: read, prepare, score and reduce wired together as passes over the data
(``job.py`` is the recipe, ``record.py`` declares the passes), each module importing only from
those before it in the data flow."""
