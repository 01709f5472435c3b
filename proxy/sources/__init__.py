"""Flag sources: each vendor's definitions become engine ``Flag`` objects here, quirks included.

``base.py`` is the contract (``Source``), ``registry.py`` the list of sources in precedence order;
one package per source (``native/``, ``split/``). Nothing outside a source's package knows its format.
"""
