"""What every stage shares and nothing of the domain: atomic files and checksums (``io``),
argument checks (``checks``), locks (``locks``), progress lines (``progress``) and the
allocator setting (``allocator``). Imports nothing else from ``retrieval``."""
