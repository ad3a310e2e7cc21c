"""Stage 1: mail enters — SMTP/LMTP listeners (``smtp``), per-account IMAP watchers
(``imap``) and recorded files (``replay``).  Each only parses, hands the message to
:meth:`mailrouter.pipeline.Pipeline.accept` and acknowledges after it returns."""
