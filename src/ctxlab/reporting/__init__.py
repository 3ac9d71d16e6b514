"""Reporting, above the accounting: the rows behind ``ctxlab report`` / ``inspect``
(``rows``), their rich tables (``tables``), plots (``plots``), the published claims with
their sources and data (``claims``, ``published``) and caches measured on tiny models
(``measure``)."""
