"""Google Cloud Dataflow: the offline dry run and the Flex Template.

Dataflow cannot be reached from where moesif-beam is developed, so what is tested here is
everything short of the service: the job a run would submit, built with no network and no
credentials (:mod:`.job`), and the Flex Template's metadata and launcher (:mod:`.flex_template`;
``metadata.json`` and ``Dockerfile`` beside them).
"""
