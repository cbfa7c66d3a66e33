"""Collecting preferences: sample K answers per prompt from a pool of VLMs (:mod:`~vpa_lightning.collect.sample`,
``vpa sample``), rate them (:mod:`~vpa_lightning.collect.judge`, ``vpa judge``, with the rubrics of
:mod:`~vpa_lightning.collect.rubrics`), and serve a local VLM behind the OpenAI API (:mod:`~vpa_lightning.collect.serve`,
``vpa serve``). The output is VLFeedback's layout, which ``vpa-shard build`` reads as it is.

Imports go one way: cli -> sample / judge -> rubrics, prompts -> models.
"""
