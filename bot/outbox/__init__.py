"""The durable outbox: product details promised on a call reach the caller and the call center.

A tool writes the message into the outbox (committed and fsync'd) before it answers the model;
relays then deliver each row as exactly one SMS and at-least-once signed webhooks, across
crashes, restarts, flaky peers and any number of processes sharing the outbox.

- `outbox.py`: the front door (`Outbox`): queue messages, wait for an SMS outcome, health.
- `store.py`: the SQL interface; `sqlite.py` (DATABASE_PATH, the embedded default) and
  `postgres.py` (DATABASE_URL, shared by many processes and machines) implement it.
- `messages.py`: the SMS text and the Standard Webhooks signing, pure.
- `relay.py`: the worker that leases due rows and delivers them.
- `cli.py`: `python -m bot outbox` for operators (list, retry, re-enable webhooks, relay only).
"""

from bot.outbox.outbox import Outbox, open_outbox
from bot.outbox.relay import Relay, running_outbox
from bot.outbox.rows import OutboxRow

__all__ = ["Outbox", "OutboxRow", "Relay", "open_outbox", "running_outbox"]
