"""What every stage shares and nothing of the domain: atomic files and checksums (``io``),
argument checks (``checks``), the order of search results (``ties``), locks between threads
and on files and folders (``locks``), progress lines (``progress``), the console's copy in a
run's log (``console``), what the hardware offers (``hardware``), moving files with a journal
(``moves``) and glibc malloc's settings (``allocator``). Imports nothing else from
``retrieval``."""
