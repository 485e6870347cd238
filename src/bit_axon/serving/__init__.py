"""``bit-axon serve``: the OpenAI-compatible API (``app``), its generation engine with continuous
batching (``engine``, ``batching``), the served models (``models``), the request shapes
(``protocol``), the dashboard's run reader (``runs``) and the web page (``static/``)."""
