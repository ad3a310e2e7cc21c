"""mailrouter: routes customer email between helpdesk accounts.

Mail enters (ingest), is attached to a conversation (threads), is given a destination
(routing), may cause a notice to the customer (notify), and leaves (deliver).  The store
keeps all of it; ``transfer`` moves a conversation between accounts.
"""

__version__ = "0.1.0"
