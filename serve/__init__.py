"""``scbert_serve``: the HTTP cell-type annotation service (``scbert serve``).

``app``: the FastAPI app (``make_api``) on a replica that loaded its model through a
``load_model`` callable, and the Ray Serve deployment and application builder that run it
(``scbert_serve.app:build``); ``schema``: the request and response bodies; ``h5ad_body``: the
checks on an ``.h5ad`` request body; ``metrics``: Prometheus metrics; ``client``: a client that
retries what it should; ``proxy``: the 503 answer when a replica is lost mid-request.
"""
