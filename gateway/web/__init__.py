"""The cluster dashboard each gateway serves on ``--web-port`` (Bitfusion's 54000).

A web page, its JSON API (``/api/v1/...``, described by ``/api/v1/openapi.json``) and
Prometheus ``/metrics``. The web app is a client of the gateway protocol like any other: it
asks this gateway and its peers with the token the browser logged in with, so what a user
may see and do is decided by the gateways' own rules (a plain token sees its own shares; an
admin token sees and acts on all).
"""
